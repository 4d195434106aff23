"""Provider Batch APIs as a second executor (``engine.request.batch.executor.BatchExecutor``).

executor   BatchExecutor (the Executor seam), custom ids; one lane per key of a pool
keys       Unmetered admission (picks a pool's key), KeptAtProvider (a refused key's batch)
slots      the waiting requests in compact arrays (packed custom ids, a table to their slots)
feed       ``fair generate --mode batch``: input lines into batches, one callback for all
journal    RUN_DIR/batches/journal.jsonl: open -> creating -> submitted -> ended -> ingested
wire       what a provider wire provides; the control-call helper
openai     files + /batches (output and error files)
anthropic  /messages/batches (results_url)
gemini     Files API upload, models/M:batchGenerateContent, batches/ID, responsesFile download
cli        ``fair batches list|attach|cancel RUN_DIR``
"""
