"""Provider Batch APIs as a second executor (``engine.request.batch.executor.BatchExecutor``).

executor   BatchExecutor (the Executor seam), Unmetered admission, custom ids
journal    RUN_DIR/batches/journal.jsonl: open -> creating -> submitted -> ended -> ingested
wire       what a provider wire provides; the control-call helper
openai     files + /batches (output and error files)
anthropic  /messages/batches (results_url)
cli        ``fair batches list|attach|cancel RUN_DIR``
"""
