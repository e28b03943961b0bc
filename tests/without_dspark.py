"""Python source that makes `dspark` unimportable in a fresh process: prepended to the remote-code loader scripts,
so that a passing test proves the checkpoint loads for a user who never installed the package."""

BLOCK_DSPARK = """
import importlib.abc, sys


class BlockDspark(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "dspark" or name.startswith("dspark."):
            raise ImportError("dspark is deliberately not importable in this process")
        return None


sys.meta_path.insert(0, BlockDspark())
"""
