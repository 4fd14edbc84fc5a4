"""python -m hyq_tvm.bench: the bench command (hyq_tvm/cli/bench.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("bench")
