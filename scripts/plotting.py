"""matplotlib's pyplot for the report scripts, headless, or None (with a note) without it."""
import sys


def pyplot(script):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("%s: matplotlib not installed (python3-matplotlib); no plot" % script, file=sys.stderr)
        return None
    return plt
