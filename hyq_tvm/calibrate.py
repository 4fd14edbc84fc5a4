"""python -m hyq_tvm.calibrate: the calibrate command (hyq_tvm/cli/calibrate.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("calibrate")
