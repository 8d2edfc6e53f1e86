"""cluster/ holds what it promises: parsed manifests and configs, not greps, checked for the safety defaults.

Token auth from a Secret on every Ray container, nothing exposed, the dashboard of a `ray up` head on localhost,
no Ray port in its security group, no credential in any file, the image installed exactly like the Makefile
installs, and the pieces agreeing with each other (MLflow's Service name, the job spec, the image's folder).
The helper scripts run for real, against stand-ins for kubectl and mlflow.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
IMAGE = "vaedist:0.1.0"
TOKEN_SECRET = {"name": "ray-auth-token", "key": "auth_token"}
MLFLOW_URI = "http://mlflow.vaedist.svc:5000"
RAY_PORTS = {6379, 8265, 10001}


# ------------------------------------------------------------------------------------------------- helpers


def yaml_files() -> list[Path]:
    return sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml")])


def load_docs(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects(kind: str | None = None) -> list[tuple[Path, dict]]:
    out = []
    for path in yaml_files():
        for doc in load_docs(path):
            if isinstance(doc, dict) and "apiVersion" in doc and (kind is None or doc.get("kind") == kind):
                out.append((path, doc))
    return out


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            found[name.lower()] = version
    return found


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """Every RayClusterSpec: the RayCluster's own and each RayJob's inline one."""
    specs = [(f"RayCluster {d['metadata']['name']}", d["spec"]) for _, d in k8s_objects("RayCluster")]
    specs += [
        (f"RayJob {d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for _, d in k8s_objects("RayJob")
    ]
    return specs


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) of the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_containers(spec: dict) -> list[tuple[str, dict]]:
    return [
        (f"{name}/{c['name']}", c)
        for name, group in groups(spec)
        for c in group["template"]["spec"]["containers"]
    ]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def gpus(container: dict) -> int:
    limits = container.get("resources", {}).get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def assert_token_from_secret(where: str, env: dict[str, dict]) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE is not 'token'"
    token = env.get("RAY_AUTH_TOKEN")
    assert token is not None, f"{where}: no RAY_AUTH_TOKEN"
    assert "value" not in token, f"{where}: RAY_AUTH_TOKEN has a literal value"
    ref = token.get("valueFrom", {}).get("secretKeyRef", {})
    assert {k: ref.get(k) for k in TOKEN_SECRET} == TOKEN_SECRET, (
        f"{where}: RAY_AUTH_TOKEN not from {TOKEN_SECRET}"
    )
    assert not ref.get("optional"), f"{where}: the token Secret must not be optional"


def walk_env_lists(node: Any):
    """Every `env:` list anywhere in a document (containers, autoscalerOptions, submitter templates...)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "env" and isinstance(value, list):
                yield value
            yield from walk_env_lists(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_env_lists(item)


# --------------------------------------------------------------------------------------------- parsing


def test_there_are_manifests_to_check() -> None:
    names = {p.relative_to(CLUSTER).as_posix() for p in yaml_files()}
    for expected in ("kuberay/raycluster.yaml", "kuberay/rayjob-tune-cifar.yaml", "aws/cluster.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_yaml_parses_into_mappings(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    assert all(isinstance(d, dict) for d in docs), f"{path}: every document must be a mapping"


def test_kustomizations_list_existing_files() -> None:
    for path in CLUSTER.rglob("kustomization.yaml"):
        for resource in yaml.safe_load(path.read_text()).get("resources", []):
            assert (path.parent / resource).is_file(), f"{path}: {resource} does not exist"


# ---------------------------------------------------------------------------------------- KubeRay shape


def test_ray_resources_use_ray_v1_the_image_and_the_pinned_ray() -> None:
    ray_objects = k8s_objects("RayCluster") + k8s_objects("RayJob")
    assert {d["kind"] for _, d in ray_objects} == {"RayCluster", "RayJob"}
    for path, doc in ray_objects:
        assert doc["apiVersion"] == "ray.io/v1", f"{path}: {doc['apiVersion']}"
    for where, spec in ray_cluster_specs():
        assert spec["rayVersion"] == pins()["ray"], f"{where}: rayVersion differs from constraints.txt"
        for name, container in ray_containers(spec):
            assert container["image"] == IMAGE, f"{where} {name}: image {container['image']}"
    for _, job in k8s_objects("RayJob"):
        for container in job["spec"]["submitterPodTemplate"]["spec"]["containers"]:
            assert container["image"] == IMAGE


def test_head_trains_nothing_and_a_gpu_group_autoscales_within_bounds() -> None:
    for where, spec in ray_cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", f"{where}: head offers CPUs"
        assert all(gpus(c) == 0 for c in spec["headGroupSpec"]["template"]["spec"]["containers"])
        assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling off"
        gpu_groups = [
            g for g in spec["workerGroupSpecs"] if any(gpus(c) for c in g["template"]["spec"]["containers"])
        ]
        assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu"
        for group in gpu_groups:
            for container in group["template"]["spec"]["containers"]:
                res = container["resources"]
                assert gpus(container) == 1, f"{where}: one GPU per pod"
                assert int(res["requests"]["nvidia.com/gpu"]) == gpus(container)
            lo, hi = group["minReplicas"], group["maxReplicas"]
            assert isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi and hi >= 1, (where, lo, hi)
            assert lo <= group.get("replicas", lo) <= hi


def test_every_ray_container_takes_the_token_from_the_secret() -> None:
    checked = 0
    for where, spec in ray_cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": TOKEN_SECRET["name"]}, where
        for name, container in ray_containers(spec):
            assert_token_from_secret(f"{where} {name}", env_of(container))
            checked += 1
        # The autoscaler sidecar talks to the GCS too.
        autoscaler_env = {e["name"]: e for e in spec["autoscalerOptions"]["env"]}
        assert_token_from_secret(f"{where} autoscaler", autoscaler_env)
    for _, job in k8s_objects("RayJob"):
        for container in job["spec"]["submitterPodTemplate"]["spec"]["containers"]:
            assert_token_from_secret(f"RayJob submitter {container['name']}", env_of(container))
            checked += 1
    assert checked >= 5


def test_no_credential_env_var_has_a_literal_value() -> None:
    secretish = re.compile(r"TOKEN|PASSWORD|SECRET|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
    for path, doc in k8s_objects():
        for env in walk_env_lists(doc):
            for entry in env:
                if secretish.search(entry["name"]) and not entry["name"].endswith("_PATH"):
                    assert "value" not in entry, f"{path}: {entry['name']} has a literal value"
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (
                        f"{path}: {entry['name']} not from a Secret"
                    )


def test_no_secret_object_carries_data() -> None:
    for path, doc in k8s_objects("Secret"):
        assert not doc.get("data") and not doc.get("stringData"), f"{path}: a Secret with values in a file"


def test_nothing_is_exposed_outside_the_cluster() -> None:
    for path, svc in k8s_objects("Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", (
            f"{path}: Service {svc['metadata']['name']}"
        )
    assert not k8s_objects("Ingress"), "no Ingress: reach the dashboard and MLflow with kubectl port-forward"
    for where, spec in ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP", (
            f"{where}: head service {head['serviceType']}"
        )
        assert head.get("enableIngress") is False, f"{where}: enableIngress must be false"
        assert (
            "headService" not in head or head["headService"]["spec"].get("type", "ClusterIP") == "ClusterIP"
        )
    policed = {
        d["spec"]["podSelector"]["matchLabels"].get("app.kubernetes.io/component")
        for _, d in k8s_objects("NetworkPolicy")
    }
    assert "ray" in policed, "no NetworkPolicy for the Ray pods"


def test_ray_pods_reach_mlflow_and_share_storage() -> None:
    services = {(d["metadata"]["name"], d["metadata"]["namespace"]): d for _, d in k8s_objects("Service")}
    mlflow = services[("mlflow", "vaedist")]  # what http://mlflow.vaedist.svc:5000 resolves to
    assert [p["port"] for p in mlflow["spec"]["ports"]] == [5000]
    pvcs = {d["metadata"]["name"]: d for _, d in k8s_objects("PersistentVolumeClaim")}
    assert pvcs["vaedist-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, spec in ray_cluster_specs():
        for name, group in groups(spec):
            pod = group["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            for container in pod["containers"]:
                env = env_of(container)
                assert env["MLFLOW_TRACKING_URI"]["value"] == MLFLOW_URI, f"{where} {name}"
                storage = env["VAEDIST_STORAGE_PATH"]["value"]
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert storage.startswith("/mnt/vaedist/") and "/mnt/vaedist" in mounts, f"{where} {name}"
                claim = volumes[mounts["/mnt/vaedist"]]["persistentVolumeClaim"]["claimName"]
                assert claim in pvcs, f"{where} {name}: no PVC {claim}"
            assert pod.get("securityContext", {}).get("privileged") is not True


def test_mlflow_server_accepts_the_name_the_ray_pods_use() -> None:
    deployment = next(d for _, d in k8s_objects("Deployment") if d["metadata"]["name"] == "mlflow")
    env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
    allowed = env["MLFLOW_ALLOWED_HOSTS"]["value"].split(",")
    assert "mlflow.vaedist.svc:5000" in allowed  # else MLflow's DNS-rebinding guard refuses the workers
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-db"
    assert env["MLFLOW_BASIC_AUTH"]["value"] == "0" and env["MLFLOW_PRIVATE_NETWORK"]["value"] == "1"


def test_rayjob_runs_tune_cifar_from_the_image_and_cleans_up() -> None:
    [(_, job)] = k8s_objects("RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == "python -m vaedist run jobs/tune-cifar.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("activeDeadlineSeconds", 0) > 0
    assert (REPO / "jobs" / "tune-cifar.yaml").is_file()
    # The job runs in the project copy the image holds.
    workdir = re.search(r"^WORKDIR\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == workdir
    # vaedist counts the GPUs present when the job starts: the cluster must begin with one trial's worth.
    tune_spec = yaml.safe_load((REPO / "jobs" / "tune-cifar.yaml").read_text())
    per_trial = tune_spec["resources"]["workers"] * tune_spec["resources"]["gpus_per_worker"]
    gpu_pods = sum(g["minReplicas"] for g in spec["rayClusterSpec"]["workerGroupSpecs"]
                   if any(gpus(c) for c in g["template"]["spec"]["containers"]))  # fmt: skip
    assert gpu_pods >= per_trial, f"tune-cifar needs {per_trial} GPUs at start, the RayJob starts {gpu_pods}"


# ---------------------------------------------------------------------------------- image == Makefile


def _makefile_install_args() -> list[str]:
    text = (REPO / "Makefile").read_text()
    pip_line = re.search(r"^PIP\s*:?=\s*(.+)$", text, re.MULTILINE).group(1)
    tokens = shlex.split(pip_line)
    at = next(i for i, t in enumerate(tokens) if t == "pip" or t.endswith("/pip"))
    recipe = re.search(r"^\$\(VENV\)/\.runtime:.*\n((?:\t.*\n)+)", text, re.MULTILINE).group(1)
    pip_call = next(line for line in recipe.splitlines() if "$(PIP)" in line)
    return tokens[at + 1 :] + shlex.split(pip_call.split("$(PIP)", 1)[1])


def _dockerfile_pip_installs(path: Path) -> list[list[str]]:
    """The arguments after `pip` of every `pip install` in the RUN instructions."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in text.splitlines():
        if not line.strip().upper().startswith("RUN "):
            continue
        for part in re.split(r"&&|;|\|\|", line.strip()[4:]):
            tokens = shlex.split(part)
            for i, token in enumerate(tokens[:-1]):
                if (token == "pip" or token.endswith("/pip")) and tokens[i + 1] == "install":
                    found.append(tokens[i + 1 :])
    return found


def test_dockerfile_installs_exactly_like_the_makefile() -> None:
    make = _makefile_install_args()
    assert make[:3] == ["install", "-q", "-c"] and "constraints.txt" in make
    installs = _dockerfile_pip_installs(CLUSTER / "Dockerfile")
    assert installs == [make], f"Dockerfile installs {installs}, the Makefile {make}"


def test_dockerfile_base_and_defaults() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith(f"rayproject/ray:{pins()['ray']}-py311-"), base
    assert not base.endswith("-cpu"), "the default image must be a CUDA one"
    assert re.search(r"^ENV RAY_AUTH_MODE=token$", text, re.MULTILINE)
    assert "PIP_CONFIG_FILE=/dev/null" in text  # no CPU-wheel find-links from a dev machine's pip config
    assert re.search(r"^COPY .*\bconstraints\.txt\b", text, re.MULTILINE)
    assert "check_image.py" in text


def test_mlflow_server_image_is_pinned_to_the_clients_mlflow() -> None:
    installs = _dockerfile_pip_installs(CLUSTER / "mlflow" / "Dockerfile")
    assert len(installs) == 1
    args = installs[0]
    assert Path(args[args.index("-c") + 1]).name == "constraints.txt"
    requirements = (CLUSTER / "mlflow" / "requirements.txt").read_text()
    assert re.search(rf"^mlflow\[auth\]=={re.escape(pins()['mlflow'])}$", requirements, re.MULTILINE)
    # SQLAlchemy 2.1 maps postgresql:// to psycopg 3: that driver must be in the image.
    assert re.search(r"^psycopg\[binary\]==", requirements, re.MULTILINE)


def test_image_check_knows_a_pin_for_every_runtime_dependency() -> None:
    sys.path.insert(0, str(CLUSTER))
    try:
        import check_image
    finally:
        sys.path.remove(str(CLUSTER))
    names = check_image.runtime_requirements()
    assert {"torch", "ray", "mlflow"} <= set(names)
    pinned = check_image.read_pins(REPO / "constraints.txt")
    assert [n for n in names if check_image.canonical(n) not in pinned] == []


@pytest.mark.slow
def test_image_check_passes_in_the_dev_venv() -> None:
    # Same pins here as in the image; only the CUDA requirement is waived (these machines use the CPU wheel).
    result = subprocess.run(
        [sys.executable, str(CLUSTER / "check_image.py"), "--torch-build", "any"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "image check: ok" in result.stdout


# ---------------------------------------------------------------------------------------------- ray up


@pytest.fixture(scope="module")
def ray_up() -> dict:
    return yaml.safe_load((CLUSTER / "aws" / "cluster.yaml").read_text())


def test_ray_up_config_is_valid_for_this_ray(ray_up: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(
        prepare_config(ray_up)
    )  # Ray's own schema and checks, defaults filled in as `ray up` does


def test_ray_up_is_aws_with_a_gpu_worker_type_and_a_cpu_only_head(ray_up: dict) -> None:
    assert ray_up["provider"]["type"] == "aws"
    types = ray_up["available_node_types"]
    head = types[ray_up["head_node_type"]]
    assert head["resources"].get("CPU") == 0
    gpu_types = [t for name, t in types.items() if name != ray_up["head_node_type"]
                 and re.match(r"(g\d|p\d)", t["node_config"]["InstanceType"])]  # fmt: skip
    assert gpu_types, "no GPU worker type (g*/p* instance)"
    for t in gpu_types:
        assert 0 <= t["min_workers"] <= t["max_workers"] and t["max_workers"] >= 1
    assert ray_up["docker"]["image"].endswith("/" + IMAGE)


def test_ray_up_dashboard_stays_on_localhost(ray_up: dict) -> None:
    head_cmds = " ".join(ray_up["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_cmds)
    assert hosts == ["127.0.0.1"], f"dashboard host {hosts}: reach it with `ray dashboard` (SSH tunnel)"
    assert "--num-cpus=0" in head_cmds
    opened = ray_up["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in opened:
        ports = set(range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1))
        assert not ports & RAY_PORTS and rule.get("IpProtocol") != "-1", (
            f"security group opens Ray ports: {rule}"
        )


def test_ray_up_token_auth_mlflow_and_s3(ray_up: dict) -> None:
    run_options = " ".join(ray_up["docker"]["run_options"])
    assert "-e RAY_AUTH_MODE=token" in run_options
    assert "RAY_AUTH_TOKEN=" not in run_options  # the token travels as a file, never in the config
    mounts = ray_up["file_mounts"]
    assert mounts.get("/home/ray/.ray/auth_token", "").startswith("~/.ray/"), mounts
    assert re.search(r"-e MLFLOW_TRACKING_URI=http://\S+", run_options)
    assert re.search(r"-e VAEDIST_STORAGE_PATH=s3://\S+", run_options)
    assert ray_up["provider"].get("cache_stopped_nodes") is False


# ------------------------------------------------------------------------------------ secret scanning

# Shell parameter expansions (${VAR}, ${VAR:-}) are references, not values: normalised before scanning.
_EXPANSION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-=?+][^}]*)?\}")
_PASSWORD = re.compile(r"(?i)\b\w*pass(?:word|wd)\b[\"'`]?\s*[:=]\s*(\S*)")
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret key": re.compile(r"(?i)aws_secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{20,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Ray-style token (64 hex)": re.compile(r"(?<![0-9a-fA-F])[0-9a-f]{64}(?![0-9a-fA-F])"),
    "token literal": re.compile(r"(?i)\w*token\w*[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9+/_.-]{20,}"),
    "password in a URI": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@\"'`]+:[^@\s/\"'`]+@"),
}


def find_secrets(text: str) -> list[str]:
    problems = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = _EXPANSION.sub("$X", raw)
        for what, pattern in SECRET_PATTERNS.items():
            if pattern.search(line):
                problems.append(f"line {number}: {what}: {raw.strip()}")
        for match in _PASSWORD.finditer(line):
            value = match.group(1).strip("\"'`,;)")
            # A reference ($VAR, <placeholder>, {{template}}) or nothing at all is fine; a literal is not.
            if value and not value.startswith(("$", "<", "{{")):
                problems.append(f"line {number}: password literal: {raw.strip()}")
    return problems


def _fake(*parts: str) -> str:
    return "".join(parts)  # assembled at run time so that this file trips no scanner itself


@pytest.mark.parametrize(
    "line",
    [
        _fake("aws_access_key_id = AKIA", "IOSFODNN7EXAMPLE"),
        _fake("aws_secret_access_key: wJalrXUtnFEMI/K7MDENG/", "bPxRfiCYEXAMPLEKEY"),
        _fake("-----BEGIN OPENSSH ", "PRIVATE KEY-----"),
        "  password: hunter2",
        "PGPASSWORD=hunter2 mlflow server",
        "MLFLOW_TRACKING_PASSWORD: 'hunter2'",
        "export RAY_AUTH_TOKEN=" + "3f" * 32,
        "RAY_AUTH_TOKEN: abcdefghijklmnopqrstuvwxyz012345",
        "--backend-store-uri postgresql://mlflow:hunter2@db:5432/mlflow",
    ],
)
def test_secret_scanner_catches(line: str) -> None:
    assert find_secrets(line), line


@pytest.mark.parametrize(
    "line",
    [
        '[[ -z "${PGPASSWORD:-}" ]]',
        'export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$HOME/.ray/vaedist-kuberay.token"',
        "            - name: PGPASSWORD",
        "                  key: password",
        "read -rsp 'DB password: ' PGPASSWORD",
        'backend="postgresql://${db_user}@${MLFLOW_DB_HOST}:${db_port}/${db_name}"',
        "MLFLOW_TRACKING_PASSWORD: $MLFLOW_TRACKING_PASSWORD",
        "    secretName: ray-auth-token",
        "kubectl -n vaedist create secret generic ray-auth-token --from-file=auth_token=/dev/stdin",
    ],
)
def test_secret_scanner_lets_references_through(line: str) -> None:
    assert find_secrets(line) == []


def test_no_plaintext_secret_anywhere_under_cluster() -> None:
    scanned, problems = 0, []
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        scanned += 1
        problems += [f"{path.relative_to(REPO)}: {p}" for p in find_secrets(text)]
    assert scanned >= 10
    assert problems == [], "\n".join(problems)


# ------------------------------------------------------------------------------ the scripts, for real


def _stand_in(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


FAKE_KUBECTL = r"""
printf '%s\n' "$*" >> "$FAKE_DIR/argv.log"
case " $* " in
  *" get secret "*) [[ -n "${FAKE_EXISTS:-}" ]] && exit 0 || exit 1 ;;
  *" create secret generic "*)
    name="" key="" prev=""
    for arg in "$@"; do
      [[ $prev == generic ]] && name=$arg
      [[ $arg == --from-file=* ]] && { key=${arg#--from-file=}; key=${key%%=*}; }
      prev=$arg
    done
    cat > "$FAKE_DIR/$name.$key" ;;
esac
exit 0
"""


def test_create_secrets_keeps_values_off_command_lines_and_screens(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _stand_in(bindir, "kubectl", FAKE_KUBECTL)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(tmp_path)}
    db_password = "correct-horse-battery-staple"
    result = subprocess.run(
        ["bash", str(KUBERAY / "create-secrets.sh"), "--mlflow", "ns-under-test"],
        input=db_password + "\n", env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    token = (tmp_path / "ray-auth-token.auth_token").read_text()
    admin = (tmp_path / "mlflow-admin.password").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token) and re.fullmatch(r"[0-9a-f]{64}", admin)
    assert token != admin
    assert (tmp_path / "mlflow-db.password").read_text() == db_password
    argv = (tmp_path / "argv.log").read_text()
    assert "-n ns-under-test create secret generic ray-auth-token --from-file=auth_token=/dev/stdin" in argv
    for value in (token, admin, db_password):
        assert value not in argv and value not in result.stdout + result.stderr

    # A second run keeps what exists.
    (tmp_path / "argv.log").unlink()
    again = subprocess.run(
        ["bash", str(KUBERAY / "create-secrets.sh")], env={**env, "FAKE_EXISTS": "1"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert again.returncode == 0 and "kept" in again.stdout
    assert "create secret" not in (tmp_path / "argv.log").read_text()


FAKE_MLFLOW = r"""
printf '%s\n' "$@" > "$FAKE_DIR/args"
[[ -n "${MLFLOW_AUTH_CONFIG_PATH:-}" ]] && cp "$MLFLOW_AUTH_CONFIG_PATH" "$FAKE_DIR/auth.ini"
exit 0
"""


@pytest.fixture
def mlflow_script(tmp_path: Path):
    fake = _stand_in(tmp_path, "mlflow", FAKE_MLFLOW)
    base = {
        "PATH": os.environ["PATH"], "HOME": str(tmp_path), "FAKE_DIR": str(tmp_path), "MLFLOW_BIN": str(fake),
        "MLFLOW_DB_HOST": "db.internal", "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlflow",
        "PGPASSWORD": "pg-secret-value",
    }  # fmt: skip

    def run(**overrides: str | None) -> subprocess.CompletedProcess:
        env = {**base, **overrides}
        env = {k: v for k, v in env.items() if v is not None}
        return subprocess.run(
            ["bash", str(CLUSTER / "mlflow" / "mlflow-server.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    return run


def test_mlflow_script_serves_postgres_and_proxied_artifacts_without_the_password(
    mlflow_script, tmp_path: Path
) -> None:
    result = mlflow_script()
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[0] == "server"
    flags = dict(zip(args[1::2], args[2::2], strict=False))
    assert args[args.index("--backend-store-uri") + 1] == "postgresql://mlflow@db.internal:5432/mlflow"
    assert "--serve-artifacts" in args
    assert args[args.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert args[args.index("--host") + 1] == "127.0.0.1", flags  # this machine only, unless told otherwise
    assert "--app-name" not in args
    assert "pg-secret-value" not in "\n".join(args) + result.stdout + result.stderr


def test_mlflow_script_basic_auth_keeps_the_password_out_of_its_config(mlflow_script, tmp_path: Path) -> None:
    result = mlflow_script(
        MLFLOW_HOST="0.0.0.0", MLFLOW_BASIC_AUTH="1", MLFLOW_ALLOWED_HOSTS="mlflow.example:5000"
    )
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[args.index("--app-name") + 1] == "basic-auth"
    assert args[args.index("--allowed-hosts") + 1] == "mlflow.example:5000"
    ini = (tmp_path / "auth.ini").read_text()
    assert "database_uri = postgresql://mlflow@db.internal:5432/mlflow_auth" in ini
    assert "pg-secret-value" not in ini and "admin_password" not in ini


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"MLFLOW_HOST": "0.0.0.0"}, "refusing to serve 0.0.0.0:5000 without authentication"),
        ({"PGPASSWORD": None}, "no database password"),
        ({"MLFLOW_DB_HOST": None}, "set MLFLOW_DB_HOST"),
        ({"MLFLOW_BASIC_AUTH": "maybe"}, "MLFLOW_BASIC_AUTH must be 0 or 1"),
    ],
)
def test_mlflow_script_refuses_unsafe_or_incomplete_setups(
    mlflow_script, tmp_path: Path, overrides: dict, message: str
) -> None:
    result = mlflow_script(**overrides)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert not (tmp_path / "args").exists(), "mlflow must not have been started"


def test_mlflow_script_private_network_is_an_explicit_choice(mlflow_script, tmp_path: Path) -> None:
    result = mlflow_script(MLFLOW_HOST="0.0.0.0", MLFLOW_PRIVATE_NETWORK="1")
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    assert args[args.index("--host") + 1] == "0.0.0.0" and "--app-name" not in args
