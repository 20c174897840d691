"""Helper scripts, run by path (`python scripts/screenshot.py ...`); importable as the
`scripts` package from the repository root, where bench.serve_load and tests/test_browser.py
take `scripts.screenshot.Server` (one way to start `aligna serve`)."""
