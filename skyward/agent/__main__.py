"""``python -m skyward.agent``: serve frames on stdin/stdout (``--child``: a process slot)."""

from skyward.agent.serve import main

if __name__ == "__main__":
    main()
