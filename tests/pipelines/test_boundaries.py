"""Component definitions and pipeline modules import neither torch nor transformers at module level (they are
imported to compile pipelines on machines without them); the heavy work happens inside the steps."""

from __future__ import annotations

import subprocess
import sys

import pytest

DEFINITION_MODULES = (
    "vlpipe.components.release",
    "vlpipe.components.pipeline_run.component",
    "vlpipe.components.data.component",
    "vlpipe.components.pretrain.component",
    "vlpipe.components.sft.component",
    "vlpipe.components.mpo.component",
    "vlpipe.components.prm.component",
    "vlpipe.components.evaluate.component",
    "vlpipe.components.register.component",
    "vlpipe.components.promote.component",
    "vlpipe.components.deploy.component",
    "vlpipe.components.promote.config",
    "vlpipe.components.deploy.config",
    "vlpipe.components.training.task",
    "vlpipe.components.evaluate.task",
    "vlpipe.pipelines.config",
    "vlpipe.pipelines.dag",
    "vlpipe.pipelines.compile",
    "vlpipe.pipelines.submit",
    "vlpipe.pipelines.local",
)


@pytest.mark.parametrize("module", DEFINITION_MODULES)
def test_module_imports_without_torch(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_component_bodies_only_import_and_call_one_entrypoint():
    """A component body is a docstring, imports from vlpipe, and one call (no training or eval logic)."""
    import ast
    import inspect

    from vlpipe.components.data import component as data
    from vlpipe.components.deploy.component import deploy_model
    from vlpipe.components.evaluate.component import evaluate
    from vlpipe.components.mpo.component import mpo
    from vlpipe.components.pipeline_run import component as run
    from vlpipe.components.pretrain.component import pretrain
    from vlpipe.components.prm.component import prm
    from vlpipe.components.promote.component import promote_model
    from vlpipe.components.register.component import register_model
    from vlpipe.components.sft.component import sft

    components = [
        data.prepare_data, data.init_model, data.mix_data, pretrain, sft, mpo, prm, evaluate, register_model,
        promote_model, deploy_model, run.start_pipeline_run, run.finish_pipeline_run,
    ]  # fmt: skip
    for component in components:
        func = ast.parse(inspect.getsource(component.python_func).lstrip()).body[0]
        body = [
            node
            for node in func.body
            if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
        ]
        imports = [node for node in body if isinstance(node, ast.ImportFrom)]
        calls = [node for node in body if not isinstance(node, ast.ImportFrom)]
        assert all(node.module.startswith("vlpipe.components.") for node in imports), component.name
        assert len(calls) == 1 and isinstance(calls[0], ast.Expr | ast.Return), component.name
