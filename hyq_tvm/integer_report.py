"""python -m hyq_tvm.integer_report: the integer_report command (hyq_tvm/cli/integer_report.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("integer_report")
