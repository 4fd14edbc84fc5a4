"""python -m hyq_tvm.evaluate: the evaluate command (hyq_tvm/cli/evaluate.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("evaluate")
