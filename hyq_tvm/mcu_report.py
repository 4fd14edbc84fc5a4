"""python -m hyq_tvm.mcu_report: the mcu_report command (hyq_tvm/cli/mcu_report.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("mcu_report")
