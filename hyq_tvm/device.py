"""python -m hyq_tvm.device: the device command (hyq_tvm/cli/device.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("device")
