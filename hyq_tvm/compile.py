"""python -m hyq_tvm.compile: the compile command (hyq_tvm/cli/compile.py)."""
if __name__ == "__main__":
    from hyq_tvm.cli import run
    run("compile")
