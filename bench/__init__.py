"""Benchmarks that write JSON records to bench/results/, and the README table renderer.

Each is a module run from the repository root with aligna's environment:

    python -m bench.train_eval CONFIG          # train, score the test set
    python -m bench.published ROW              # rows against published results
    python -m bench.train_speed CONFIG...      # training tokens/s
    python -m bench.decode_speed MODEL_DIR...  # translation speed
    python -m bench.serve_load MODEL_DIR...    # `aligna serve` under load
    python -m bench.long_sentences {multi30k,reverse}
    python -m bench.checkpoint_io [CONFIG]     # checkpoint write and read times
    python -m bench.joeynmt {train-speed,train,translate-speed} CONFIG   # against JoeyNMT 2.3.0
    python -m bench.render_table [--check]     # README tables from the records

Each module's docstring says what it measures. bench.common writes the records, each with
the command that made it (`python -m bench.NAME ...`); the README shows that command next to
every row.
"""
