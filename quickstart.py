"""The main job, end to end, on a small embedded default: bash quickstart.sh (or python quickstart.py).

Runs each stage as a user would from the shell, printing the command first so you learn the real
commands. (Stages are added here as they land.)
"""

import subprocess
import sys


def run(*args):
    print("\n$ python " + " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def main():
    run("gpt.py")


if __name__ == "__main__":
    main()
