"""python -m hyq_tvm.compare: the compare command (hyq_tvm/cli/compare.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("compare")
