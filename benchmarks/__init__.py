"""mstore's benchmark suite: each measure side by side with its baseline (issue 5).

Run it with `python -m benchmarks` (see `python -m benchmarks --help`). It builds its own
inputs (a randomly initialised model with the real Qwen2.5-0.5B shape, or a tiny one with
`--quick` / `--size tiny`), measures every pair in the same run with the two sides
alternated (A B B A ...), prints a table and writes a JSON report.

Modules:
    inputs     model folders, dataset, stores (untimed set-up)
    measure    process timing (wall + peak RSS through wait4), statistics, alternation
    pairs      one function per pair
    worker     in-process measurements (load, decode, train), run as a child process
    baseline_generate   the 5-line transformers script the time-to-first-token pair runs
    report     machine info, table, JSON

Nothing here is imported by mstore or by the tests, except the smoke test that runs
`python -m benchmarks --quick`.
"""
