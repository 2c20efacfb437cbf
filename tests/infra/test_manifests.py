"""The Kubernetes manifests of infra/k8s: every file parses, base and overlays render with kustomize and pass
the Kubernetes 1.32 schema (strict), workloads are hardened, images pinned to the package version, no credential
in clear anywhere, MLflow's auth and artifact settings, RBAC, and the files generated from other sources (the
DeepSpeed ConfigMap, the serving ServiceAccount, the work PVC of the recipes) without drift."""

from __future__ import annotations

import configparser
import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from vlpipe.components.release import VERSION
from vlpipe.infra.images import is_pinned
from vlpipe.infra.manifests import (
    BASE_DIR,
    DEEPSPEED_CONFIGMAP,
    DEEPSPEED_DIR,
    K8S_DIR,
    OVERLAYS,
    SECRETS_DIR,
    containers,
    deepspeed_configmap,
    deepspeed_configmap_yaml,
    iter_manifest_files,
    kustomize,
    load_documents,
    main,
    plaintext_credentials,
    pod_spec,
    render_secrets,
    secret_template_variables,
)
from vlpipe.pipelines.config import RECIPES_DIR
from vlpipe.serving.deploy import TEMPLATE_DIR, S3Settings, ServingDeployment, service_account_manifest

K8S_VERSION = "1.32.0"
NAMESPACE = "vlpipe"
TARGETS = {"base": BASE_DIR, **OVERLAYS}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: it renders the kustomizations (kubectl kustomize)")
    return {name: kustomize(path) for name, path in TARGETS.items()}


def _one(resources: list[dict], kind: str, name: str) -> dict:
    found = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _container(resource: dict, name: str) -> dict:
    return next(c for c in containers(resource) if c["name"] == name)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(env: dict) -> tuple[str, str]:
    ref = env["valueFrom"]["secretKeyRef"]
    return ref["name"], ref["key"]


def _options(args: list[str]) -> dict[str, str | None]:
    """`--flag value` / `--flag=value` / `--flag` → {flag: value or None}."""
    options: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        flag, eq, value = args[i].partition("=")
        if eq:
            options[flag] = value
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            options[flag] = args[i + 1]
            i += 1
        else:
            options[flag] = None
        i += 1
    return options


# -- files ---------------------------------------------------------------------------------------------------
def test_every_manifest_file_parses():
    files = list(iter_manifest_files())
    names = {p.relative_to(K8S_DIR).as_posix() for p in files}
    for expected in (
        "base/kustomization.yaml",
        "overlays/dev/kustomization.yaml",
        "overlays/prod/kustomization.yaml",
        "serving/inferenceservice.yaml",
        "secrets/vlpipe-s3.yaml",
    ):
        assert expected in names
    for path in files:
        documents = load_documents(path)  # the serving and secret templates' ${...} stay strings
        assert documents, f"{path} is empty"
        for doc in documents:
            assert doc.get("kind") and (doc.get("apiVersion") or doc["kind"] == "Kustomization"), path


def test_load_documents_names_a_broken_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_documents(bad)


# -- rendering and schema ----------------------------------------------------------------------------------------
BASE_KINDS = Counter(
    {
        ("v1", "Namespace"): 1,
        ("v1", "ServiceAccount"): 2,
        ("v1", "ConfigMap"): 4,
        ("v1", "Service"): 2,
        ("v1", "PersistentVolumeClaim"): 1,
        ("apps/v1", "Deployment"): 1,
        ("apps/v1", "StatefulSet"): 1,
        ("rbac.authorization.k8s.io/v1", "Role"): 1,
        ("rbac.authorization.k8s.io/v1", "RoleBinding"): 1,
        ("networking.k8s.io/v1", "NetworkPolicy"): 2,
    }
)


def test_kustomizations_render_the_expected_resources(rendered):
    kinds = {
        name: Counter((r["apiVersion"], r["kind"]) for r in resources) for name, resources in rendered.items()
    }
    assert kinds["base"] == BASE_KINDS
    assert kinds["dev"] == BASE_KINDS
    assert kinds["prod"] == BASE_KINDS + Counter({("policy/v1", "PodDisruptionBudget"): 1})


# Custom resources (no schema in kubernetes_validate): the fields their controllers need.
CUSTOM_RESOURCE_FIELDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): ("spec.predictor",),
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): ("spec.runtimeRef",),
}


def _validate(resource: dict) -> None:
    try:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        key = (resource["apiVersion"], resource["kind"])
        assert key in CUSTOM_RESOURCE_FIELDS, f"{key}: neither a built-in kind nor a known custom resource"
        for dotted in CUSTOM_RESOURCE_FIELDS[key]:
            node: Any = resource
            for part in dotted.split("."):
                assert isinstance(node, dict) and part in node, f"{key[1]} lacks {dotted}"
                node = node[part]


@pytest.mark.parametrize("target", list(TARGETS))
def test_rendered_resources_are_named_namespaced_and_schema_valid(rendered, target):
    for resource in rendered[target]:
        meta = resource["metadata"]
        assert resource["apiVersion"] and resource["kind"] and meta["name"]
        if resource["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE and "namespace" not in meta
        else:
            assert meta.get("namespace") == NAMESPACE, f"{resource['kind']}/{meta['name']}"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "vlpipe"
        _validate(resource)


def test_schema_validation_rejects_a_wrong_field(rendered):
    deployment = json.loads(json.dumps(_one(rendered["base"], "Deployment", "mlflow")))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)
    deployment["spec"]["replicas"] = 2
    _validate(deployment)
    deployment["spec"]["replica"] = 2  # a typo: strict validation refuses unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(deployment)


def test_serving_templates_are_valid_once_filled():
    values = {
        "NAME": "internvl3-2b",
        "NAMESPACE": NAMESPACE,
        "STORAGE_URI": "s3://vlpipe-models/internvl3-2b/v1",
        "VLPIPE_VERSION": VERSION,
        "AWS_ENDPOINT_URL": "http://minio.kubeflow.svc.cluster.local:9000",
        "S3_REGION": "us-east-1",
        "S3_ENDPOINT": "minio.kubeflow.svc.cluster.local:9000",
        "S3_USE_HTTPS": "0",
        "S3_VERIFY_SSL": "0",
        "AWS_ACCESS_KEY_ID": "placeholder-id",
        "AWS_SECRET_ACCESS_KEY": "placeholder-key",
    }
    for path in sorted(TEMPLATE_DIR.glob("*.yaml")):
        text = re.sub(r"\$\{([A-Z_]+)\}", lambda m: values[m.group(1)], path.read_text())
        for resource in yaml.safe_load_all(text):
            _validate(resource)


# -- workloads -------------------------------------------------------------------------------------------------
def _workloads(resources: list[dict]) -> list[dict]:
    return [r for r in resources if r["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


@pytest.mark.parametrize("target", list(TARGETS))
def test_workloads_have_resources_probes_and_a_restricted_security_context(rendered, target):
    workloads = _workloads(rendered[target])
    assert {w["metadata"]["name"] for w in workloads} == {"mlflow", "mlflow-postgres"}
    for workload in workloads:
        where = f"{target}: {workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, where
        assert pod_security["runAsUser"] != 0, where
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        for container in containers(workload):
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where
            assert container["readinessProbe"] and container["livenessProbe"], where
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            if target != "base":
                assert container["imagePullPolicy"] == "IfNotPresent", where
            # A read-only root needs somewhere to write.
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, where


def test_overlays_size_the_platform(rendered):
    dev_mlflow = _one(rendered["dev"], "Deployment", "mlflow")
    prod_mlflow = _one(rendered["prod"], "Deployment", "mlflow")
    assert dev_mlflow["spec"]["replicas"] == 1
    assert prod_mlflow["spec"]["replicas"] >= 2
    assert _env(_container(prod_mlflow, "mlflow"))["MLFLOW_WORKERS"]["value"] == "4"
    assert _env(_container(dev_mlflow, "mlflow"))["MLFLOW_WORKERS"]["value"] == "2"
    assert _container(dev_mlflow, "mlflow")["resources"]["limits"]["memory"] == "1Gi"
    assert _container(prod_mlflow, "mlflow")["resources"]["limits"]["memory"] == "8Gi"
    pdb = _one(rendered["prod"], "PodDisruptionBudget", "mlflow")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == prod_mlflow["spec"]["selector"]["matchLabels"]
    assert prod_mlflow["spec"]["template"]["spec"]["topologySpreadConstraints"]


# -- images -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", list(TARGETS))
def test_images_are_pinned_and_vlpipe_images_carry_the_package_version(rendered, target):
    images = [c["image"] for r in rendered[target] for c in containers(r)]
    assert sorted(images) == sorted([f"ghcr.io/vlpipe/vlpipe-mlflow:{VERSION}", "postgres:16.4"])
    for ref in images:
        assert is_pinned(ref), ref
        if ref.startswith("ghcr.io/vlpipe/"):
            assert ref.rsplit(":", 1)[1] == VERSION, ref


def test_kustomizations_pin_vlpipe_images_to_the_package_version():
    kustomizations = [BASE_DIR / "kustomization.yaml", *(d / "kustomization.yaml" for d in OVERLAYS.values())]
    for path in kustomizations:
        entries = yaml.safe_load(path.read_text())["images"]
        assert entries, path
        for entry in entries:
            assert entry["name"].startswith("ghcr.io/vlpipe/"), f"{path}: {entry}"
            assert entry["newTag"] == VERSION, (
                f"{path}: {entry['name']} is tagged {entry['newTag']}, not {VERSION}"
            )
    for path in kustomizations[1:]:
        names = {e["name"] for e in yaml.safe_load(path.read_text())["images"]}
        assert names == {
            "ghcr.io/vlpipe/vlpipe",
            "ghcr.io/vlpipe/vlpipe-serving",
            "ghcr.io/vlpipe/vlpipe-mlflow",
        }


# -- credentials ------------------------------------------------------------------------------------------------
def test_no_credential_in_clear_in_any_file():
    documents = [doc for path in iter_manifest_files() for doc in load_documents(path)]
    assert plaintext_credentials(documents) == []
    secrets = [doc for doc in documents if doc["kind"] == "Secret"]
    assert {s["metadata"]["name"] for s in secrets} == {
        "vlpipe-s3",
        "mlflow-postgres",
        "mlflow-auth",
        "vlpipe-mlflow",
    }


@pytest.mark.parametrize("target", list(TARGETS))
def test_rendered_manifests_create_no_secret_and_hold_no_credential(rendered, target):
    assert [r for r in rendered[target] if r["kind"] == "Secret"] == []
    assert plaintext_credentials(rendered[target]) == []


def test_credential_check_finds_literals():
    leaky = [
        {"kind": "Secret", "metadata": {"name": "s"}, "stringData": {"password": "hunter2", "ok": "${OK}"}},
        {"kind": "Secret", "metadata": {"name": "t"}, "data": {"token": "aHVudGVyMg=="}},
        {
            "kind": "ConfigMap",
            "metadata": {"name": "c"},
            "data": {"auth.ini": "[mlflow]\nadmin_password = x\n"},
        },
        {"kind": "ConfigMap", "metadata": {"name": "d"}, "data": {"API_TOKEN": "x"}},
        {
            "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {
                "template": {
                    "spec": {"containers": [{"name": "c", "env": [{"name": "PGPASSWORD", "value": "x"}]}]}
                }
            },
        },
    ]
    findings = plaintext_credentials(leaky)
    assert len(findings) == 5
    assert "Secret/s: stringData.password" in findings[0]
    assert "Secret/t: data.token" in findings[1]
    assert "ConfigMap/c: data.auth.ini sets a password" in findings[2]
    assert "ConfigMap/d: data key API_TOKEN" in findings[3]
    assert "container c sets PGPASSWORD with a literal value" in findings[4]


def _secret_refs(resources: list[dict]) -> set[tuple[str, str]]:
    refs = set()
    for resource in resources:
        for container in containers(resource):
            for env in container.get("env", []):
                if "secretKeyRef" in env.get("valueFrom", {}):
                    refs.add(_secret_ref(env))
    return refs


def _templates() -> dict[str, dict]:
    docs = [doc for path in sorted(SECRETS_DIR.glob("*.yaml")) for doc in load_documents(path)]
    return {doc["metadata"]["name"]: doc for doc in docs}


def _recipe_secret_refs() -> set[tuple[str, str]]:
    refs = set()
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        cluster = yaml.safe_load(path.read_text()).get("cluster") or {}
        for secret in cluster.get("secrets", []):
            refs.update((secret["secret"], key) for key in secret["env"].values())
    return refs


def test_secret_templates_provide_every_key_referenced(rendered):
    templates = _templates()
    provided = {(name, key) for name, doc in templates.items() for key in doc["stringData"]}
    for target, resources in rendered.items():
        missing = _secret_refs(resources) - provided
        assert not missing, f"{target} references secret keys no template provides: {sorted(missing)}"
    recipe_refs = _recipe_secret_refs()
    # The steps read the same S3 keys as MLflow and KServe.
    assert {("vlpipe-s3", "AWS_ACCESS_KEY_ID"), ("vlpipe-s3", "AWS_SECRET_ACCESS_KEY")} <= recipe_refs
    assert recipe_refs <= provided, f"recipe secrets without a template: {sorted(recipe_refs - provided)}"
    # The serving ServiceAccount carries vlpipe-s3.
    account = _one(rendered["base"], "ServiceAccount", "vlpipe-serving")
    assert account["secrets"] == [{"name": "vlpipe-s3"}]
    for doc in templates.values():
        assert doc["metadata"]["namespace"] == "${NAMESPACE}"


def test_s3_secret_template_agrees_with_the_serving_template():
    serving = yaml.safe_load((TEMPLATE_DIR / "s3-secret.yaml").read_text())
    ours = _templates()["vlpipe-s3"]
    assert ours["metadata"]["annotations"] == serving["metadata"]["annotations"]
    assert (
        set(serving["stringData"])
        == set(ours["stringData"])
        == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    )


def test_render_secrets_fills_every_placeholder_and_names_missing_ones():
    names = secret_template_variables()
    assert "NAMESPACE" in names and "MLFLOW_ADMIN_PASSWORD" in names
    values = {name: f"v-{name.lower()}" for name in names}
    values["MLFLOW_ADMIN_PASSWORD"] = "p\"a#ss: w'ord"  # quotes, a comment sign, a colon
    values["NAMESPACE"] = NAMESPACE
    values["S3_USE_HTTPS"] = values["S3_VERIFY_SSL"] = "0"
    documents = list(yaml.safe_load_all(render_secrets(values)))
    assert len(documents) == 4
    by_name = {doc["metadata"]["name"]: doc for doc in documents}
    assert by_name["mlflow-auth"]["stringData"]["admin-password"] == "p\"a#ss: w'ord"
    assert by_name["vlpipe-s3"]["metadata"]["annotations"]["serving.kserve.io/s3-usehttps"] == "0"
    assert by_name["vlpipe-s3"]["stringData"]["AWS_ACCESS_KEY_ID"] == "v-aws_access_key_id"
    for doc in documents:
        assert doc["metadata"]["namespace"] == NAMESPACE
        _validate(doc)
    del values["MLFLOW_ADMIN_PASSWORD"], values["AWS_ACCESS_KEY_ID"]
    with pytest.raises(KeyError, match="AWS_ACCESS_KEY_ID, MLFLOW_ADMIN_PASSWORD"):
        render_secrets(values)


# -- MLflow -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", list(TARGETS))
def test_mlflow_server_uses_basic_auth_postgres_and_proxied_s3_artifacts(rendered, target):
    resources = rendered[target]
    deployment = _one(resources, "Deployment", "mlflow")
    container = _container(deployment, "mlflow")
    assert container["command"] == ["mlflow", "server"]
    options = _options(container["args"])
    assert options["--app-name"] == "basic-auth"
    assert options["--host"] == "0.0.0.0" and options["--port"] == "5000"
    assert "--serve-artifacts" in options and options["--serve-artifacts"] is None
    assert options["--artifacts-destination"] == "s3://vlpipe-mlflow/artifacts"
    backend = urlsplit(options["--backend-store-uri"])
    assert (backend.scheme, backend.username, backend.password) == ("postgresql", "mlflow", None)
    assert (backend.hostname, backend.port, backend.path) == ("mlflow-postgres", 5432, "/mlflow")

    env = _env(container)
    assert _secret_ref(env["PGPASSWORD"]) == ("mlflow-postgres", "password")  # libpq reads it
    assert _secret_ref(env["MLFLOW_AUTH_ADMIN_USERNAME"]) == ("mlflow-auth", "admin-username")
    assert _secret_ref(env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == ("mlflow-auth", "admin-password")
    assert _secret_ref(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == ("mlflow-auth", "flask-secret-key")
    assert _secret_ref(env["AWS_ACCESS_KEY_ID"]) == ("vlpipe-s3", "AWS_ACCESS_KEY_ID")
    assert _secret_ref(env["AWS_SECRET_ACCESS_KEY"]) == ("vlpipe-s3", "AWS_SECRET_ACCESS_KEY")
    assert container["envFrom"] == [{"configMapRef": {"name": "vlpipe-s3-endpoint"}}]
    endpoint = _one(resources, "ConfigMap", "vlpipe-s3-endpoint")["data"]
    assert endpoint["MLFLOW_S3_ENDPOINT_URL"] == endpoint["AWS_ENDPOINT_URL"]

    # The auth config file: mounted from the ConfigMap, database on the same PostgreSQL, no admin password.
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"]["value"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == mount["name"])
    config_map = _one(resources, "ConfigMap", volume["configMap"]["name"])
    ini = configparser.ConfigParser()
    ini.read_string(config_map["data"][config_path.name])
    assert ini["mlflow"]["default_permission"] == "READ"
    assert "admin_password" not in ini["mlflow"] and "admin_username" not in ini["mlflow"]
    auth_db = urlsplit(ini["mlflow"]["database_uri"])
    assert (auth_db.scheme, auth_db.username, auth_db.password) == ("postgresql", "mlflow", None)
    assert (auth_db.hostname, auth_db.path) == ("mlflow-postgres", "/mlflow_auth")
    init_sql = _one(resources, "ConfigMap", "mlflow-postgres-init")["data"]
    assert "CREATE DATABASE mlflow_auth;" in "".join(init_sql.values())

    # Probes on /health (open without credentials), and the Service the clients use.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    service = _one(resources, "Service", "mlflow")
    assert service["spec"]["ports"] == [{"name": "http", "port": 5000, "targetPort": "http"}]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    assert f"mlflow.{NAMESPACE}.svc.cluster.local:5000" in allowed and "mlflow:5000" in allowed


@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")
def test_mlflow_reads_the_admin_from_the_environment_and_the_rest_from_the_ini(
    rendered, tmp_path, monkeypatch
):
    """The mechanism the Deployment relies on, checked against the installed mlflow's own code."""
    from mlflow.server.auth.config import read_auth_config

    ini = _one(rendered["base"], "ConfigMap", "mlflow-auth-config")["data"]["basic_auth.ini"]
    path = tmp_path / "basic_auth.ini"
    path.write_text(ini)
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "root-of-trust")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-secret")
    config = read_auth_config()
    assert (config.admin_username, config.admin_password) == ("root-of-trust", "from-the-secret")
    assert config.database_uri == "postgresql://mlflow@mlflow-postgres:5432/mlflow_auth"
    assert config.default_permission == "READ"


@pytest.mark.filterwarnings("ignore:starlette.middleware.wsgi is deprecated")
def test_mlflow_server_options_and_variables_exist_in_mlflow(rendered):
    """Every option of the container's args is an option of the installed `mlflow server`, and the variables set
    instead of options are the ones it reads."""
    from mlflow import environment_variables
    from mlflow.cli import server

    params = {opt: p for p in server.params for opt in p.opts}
    container = _container(_one(rendered["base"], "Deployment", "mlflow"), "mlflow")
    for flag in _options(container["args"]):
        assert flag in params, f"mlflow server has no {flag}"
    assert "basic-auth" in params["--app-name"].type.choices
    assert params["--workers"].envvar == "MLFLOW_WORKERS"
    assert params["--allowed-hosts"].envvar == "MLFLOW_SERVER_ALLOWED_HOSTS"
    for name in (
        "MLFLOW_AUTH_CONFIG_PATH",
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION",
    ):
        assert getattr(environment_variables, name).name == name


def test_network_policies_admit_the_namespace_to_mlflow_and_only_mlflow_to_postgres(rendered):
    resources = rendered["base"]
    mlflow = _one(resources, "NetworkPolicy", "mlflow")["spec"]
    assert mlflow["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mlflow"}
    assert mlflow["ingress"][0]["ports"] == [{"port": 5000, "protocol": "TCP"}]
    assert {"podSelector": {}} in mlflow["ingress"][0]["from"]
    postgres = _one(resources, "NetworkPolicy", "mlflow-postgres")["spec"]
    assert postgres["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}],
            "ports": [{"port": 5432, "protocol": "TCP"}],
        }
    ]


# -- RBAC -------------------------------------------------------------------------------------------------------
EXPECTED_RUNNER_RULES = [
    {  # exactly the launcher's calls (components/training/trainjob.py: TrainJobApi)
        "apiGroups": ["trainer.kubeflow.org"],
        "resources": ["trainjobs"],
        "verbs": ["create", "get", "patch", "delete"],
    },
    {
        "apiGroups": ["serving.kserve.io"],
        "resources": ["inferenceservices"],
        "verbs": ["create", "get", "list", "watch", "patch", "update", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
]


@pytest.mark.parametrize("target", list(TARGETS))
def test_pipeline_runner_role_grants_exactly_what_the_pipeline_needs(rendered, target):
    resources = rendered[target]
    role = _one(resources, "Role", "vlpipe-pipeline-runner")
    assert role["rules"] == EXPECTED_RUNNER_RULES
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}"
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
    assert not [r for r in resources if r["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    binding = _one(resources, "RoleBinding", "vlpipe-pipeline-runner")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "vlpipe-pipeline-runner", "namespace": NAMESPACE}
    ]
    _one(resources, "ServiceAccount", "vlpipe-pipeline-runner")


# -- generated or mirrored content ------------------------------------------------------------------------------
@pytest.mark.parametrize("target", list(TARGETS))
def test_serving_service_account_is_the_generated_one_for_the_s3_endpoint(rendered, target):
    resources = rendered[target]
    account = _one(resources, "ServiceAccount", "vlpipe-serving")
    endpoint = _one(resources, "ConfigMap", "vlpipe-s3-endpoint")["data"]
    url = urlsplit(endpoint["AWS_ENDPOINT_URL"])
    annotations = account["metadata"]["annotations"]
    settings = S3Settings(
        endpoint=url.netloc,
        use_https=url.scheme == "https",
        verify_ssl=annotations["serving.kserve.io/s3-verifyssl"] == "1",
        region=endpoint["AWS_DEFAULT_REGION"],
    )
    deployment = ServingDeployment(name="x", namespace=NAMESPACE, storage_uri="s3://b/p", s3=settings)
    expected = service_account_manifest(deployment)
    assert annotations == expected["metadata"]["annotations"]
    assert account["secrets"] == expected["secrets"]
    assert account["metadata"]["namespace"] == expected["metadata"]["namespace"]


def test_s3_endpoint_is_the_recipes_one():
    from vlpipe.pipelines.config import read_recipe

    endpoint = load_documents(BASE_DIR / "s3-endpoint-configmap.yaml")[0]["data"]
    for name in ("internvl3-1b", "internvl3-2b", "internvl3-8b"):
        recipe = read_recipe(RECIPES_DIR / f"{name}.yaml")  # its base chain merged
        assert recipe["cluster"]["env"]["AWS_ENDPOINT_URL"] == endpoint["AWS_ENDPOINT_URL"]
        assert recipe["cluster"]["env"]["AWS_DEFAULT_REGION"] == endpoint["AWS_DEFAULT_REGION"]
        assert recipe["deploy"]["service"]["s3"]["endpoint"] == urlsplit(endpoint["AWS_ENDPOINT_URL"]).netloc


def test_deepspeed_configmap_has_no_drift():
    assert DEEPSPEED_CONFIGMAP.read_text() == deepspeed_configmap_yaml(), (
        "infra/k8s/base/deepspeed-configmap.yaml is stale: run `python -m vlpipe.infra.manifests deepspeed-configmap`"
    )
    shipped = load_documents(DEEPSPEED_CONFIGMAP)[0]
    files = {p.name: p.read_text() for p in sorted(DEEPSPEED_DIR.glob("*.json"))}
    assert shipped["data"] == files
    assert sorted(files) == ["zero0.json", "zero1.json", "zero2.json", "zero3-offload.json", "zero3.json"]
    from vlpipe.components.training.deepspeed import reference_configs

    assert {name: json.loads(text) for name, text in shipped["data"].items()} == reference_configs()
    assert main(["deepspeed-configmap", "--check"]) == 0


def test_deepspeed_configmap_follows_the_json_files(tmp_path):
    for path in DEEPSPEED_DIR.glob("*.json"):
        (tmp_path / path.name).write_text(path.read_text())
    (tmp_path / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}\n')
    assert deepspeed_configmap(tmp_path)["data"]["zero2.json"] == '{"zero_optimization": {"stage": 2}}\n'
    assert deepspeed_configmap_yaml(tmp_path) != DEEPSPEED_CONFIGMAP.read_text()
    (tmp_path / "zero2.json").write_text("{not json")
    with pytest.raises(ValueError, match="zero2.json is not valid JSON"):
        deepspeed_configmap(tmp_path)


def test_work_pvc_is_the_recipes_work_volume(rendered):
    recipes = [yaml.safe_load(p.read_text()) for p in sorted(RECIPES_DIR.glob("*.yaml"))]
    volumes = {(r.get("cluster") or {}).get("work_volume", {}).get("pvc") for r in recipes} - {None}
    assert volumes == {"vlpipe-work"}
    for target, resources in rendered.items():
        pvc = _one(resources, "PersistentVolumeClaim", "vlpipe-work")
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], target
        if target == "prod":
            assert pvc["spec"]["storageClassName"] == "standard-rwx"
        else:
            assert "storageClassName" not in pvc["spec"], target
    dev_pvc = _one(rendered["dev"], "PersistentVolumeClaim", "vlpipe-work")
    assert dev_pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"


@pytest.mark.parametrize("name", ["internvl3-1b", "internvl3-2b", "internvl3-8b"])
def test_cluster_recipes_point_at_the_platform_these_manifests_deploy(rendered, name):
    from vlpipe.pipelines.config import load_recipe

    recipe = load_recipe(name)
    service = _one(rendered["base"], "Service", "mlflow")
    port = service["spec"]["ports"][0]["port"]
    assert recipe.cluster.tracking_uri == f"http://mlflow.{NAMESPACE}.svc.cluster.local:{port}"
    assert recipe.deploy.service["namespace"] == NAMESPACE  # where the runner Role and vlpipe-serving live
    # The deploy step maps a version's mlflow-artifacts:/ location onto the server's artifact destination.
    server = _options(_container(_one(rendered["base"], "Deployment", "mlflow"), "mlflow")["args"])
    assert recipe.deploy.artifacts_destination == server["--artifacts-destination"]
    runner = _one(rendered["base"], "ServiceAccount", recipe.cluster.service_account)
    assert runner["metadata"]["namespace"] == NAMESPACE
    bindings = [r for r in rendered["base"] if r["kind"] == "RoleBinding"]
    assert any(s["name"] == recipe.cluster.service_account for b in bindings for s in b["subjects"]), (
        "the recipes' service account has no RoleBinding"
    )
    assert recipe.cluster.work_volume is not None and recipe.cluster.work_volume.pvc == "vlpipe-work"
    _one(rendered["base"], "PersistentVolumeClaim", "vlpipe-work")
