"""What the hostile test functions share (a helper: no function is declared here)."""


def attempt(action) -> str:
    """Run `action`; what happened, for a test to read: blocked (and how), or ALLOWED."""
    try:
        action()
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"
    return "ALLOWED"
