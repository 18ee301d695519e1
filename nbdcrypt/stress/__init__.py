"""`nbdcrypt stress`: many verifying NBD clients at once against any NBD server.

uri.py (NBD URIs), options.py (the command line), workload.py (seeded operations), pattern.py
(self-describing data), model.py and shared.py (what reads must return), session.py (one NBD
connection over asyncio), client.py (one verifying client), abuse.py (hostile clients),
runner.py (the run), stats.py and report.py (the summary), cli.py (the subcommand).
docs/STRESS.md describes what is verified and how.
"""
