"""python -m hyq_tvm.train: the train command (hyq_tvm/cli/train.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("train")
