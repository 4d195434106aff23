"""The launch layer: between the command (``engine.cli``, ``fairdistill``) and the modes.

``launch_run(RunOptions)`` and ``launch_generate(GenerateOptions)`` pick single process,
``--estimate`` or ``--ray`` (``engine.scale``, imported only then) and end every one of them
through ``finish_run(Outcome)``: the report, the error, the lines on stderr, the exit code.
"""
