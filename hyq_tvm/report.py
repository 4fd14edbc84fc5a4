"""python -m hyq_tvm.report: the report command (hyq_tvm/cli/report.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("report")
