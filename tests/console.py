"""The console script run in-process, for tests of what a user sees."""

from kdcache.cli import main


def run_cli(argv, capsys):
    """Run `kdcache ARGV`; returns (exit code, stdout, stderr)."""
    try:
        main([str(arg) for arg in argv])
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
