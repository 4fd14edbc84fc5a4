"""python -m hyq_tvm.tune: the tune command (hyq_tvm/cli/tune.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("tune")
