"""The shipped cluster files: they parse, carry the keys that matter, stay closed to the world, and
every cdd-ray command written in them exists and accepts its arguments (checked with --dry-run)."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from cdd_ray.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
IMAGE_ROOT = "/opt/cdd-ray"  # where cluster/Dockerfile puts the checkout
DRY_RUN_COMMANDS = {"train", "sweep", "grid", "submit"}


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kube(kind: str) -> list[tuple[Path, dict]]:
    found = [
        (p, d) for p in sorted(CLUSTER.glob("kuberay/*.yaml")) for d in documents(p) if d["kind"] == kind
    ]
    assert found, f"no {kind} manifest in cluster/kuberay"
    return found


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def cluster_pods(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [c for group in groups for c in containers(group["template"])]


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_every_yaml_under_cluster_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert documents(path), f"{path} is empty"


def test_no_shipped_file_turns_authentication_off_or_opens_ray_to_the_world():
    for path in [*CLUSTER.rglob("*"), ROOT / "README.md"]:
        if path.is_file():
            text = path.read_text()
            assert "RAY_AUTH_MODE=disabled" not in text.replace("`RAY_AUTH_MODE=disabled`", ""), path
            assert "0.0.0.0/0" not in text.replace("never 0.0.0.0/0", ""), path


def test_launcher_config_has_gpu_workers_token_auth_a_local_dashboard_and_pinned_installs():
    config = documents(CLUSTER / "gpu-cluster.yaml")[0]
    for key in (
        "cluster_name",
        "provider",
        "auth",
        "available_node_types",
        "head_node_type",
        "setup_commands",
    ):
        assert key in config, key
    types = config["available_node_types"]
    assert config["head_node_type"] in types and types[config["head_node_type"]]["resources"] == {"GPU": 0}
    assert any(t.get("max_workers", 0) > 0 for name, t in types.items() if name != config["head_node_type"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "RAY_AUTH_MODE=token" in head
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert any("-c ~/cdd-ray/constraints.txt" in c for c in config["setup_commands"])
    assert any("/mnt/shared" in c for c in config["setup_commands"]), "no shared storage mounted"
    ports = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in ports] == [(22, 22)], "only SSH may be reachable"


def test_kuberay_clusters_keep_services_internal_token_auth_on_and_storage_shared():
    specs = [d["spec"] for _, d in kube("RayCluster")] + [
        d["spec"]["rayClusterSpec"] for _, d in kube("RayJob") if "rayClusterSpec" in d["spec"]
    ]
    assert len(specs) >= 2
    for spec in specs:
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
        for container in cluster_pods(spec):
            env = env_of(container)
            assert env["RAY_AUTH_MODE"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]
            assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]
        for group in spec["workerGroupSpecs"]:
            assert all(
                c["resources"]["limits"]["nvidia.com/gpu"] == "1" for c in containers(group["template"])
            )
    claims = kube("PersistentVolumeClaim")
    assert all(d["spec"]["accessModes"] == ["ReadWriteMany"] for _, d in claims)


def test_rayjobs_clean_up_and_their_submitters_carry_the_token():
    for path, job in kube("RayJob"):
        spec = job["spec"]
        if "rayClusterSpec" in spec:
            assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, path
        else:
            assert "clusterSelector" in spec, f"{path}: neither a cluster spec nor a selector"
        submitter = env_of(containers(spec["submitterPodTemplate"])[0])
        assert submitter["RAY_AUTH_MODE"] == "token" and "secretKeyRef" in submitter["RAY_AUTH_TOKEN"], path


def commands_in_line(line: str) -> list[list[str]]:
    """`cdd-ray ...` at the start of a shell line, inside "..." (ray exec), or after a comment label."""
    found = []
    for match in re.finditer(r'(?:^\s*|"|#[^#]*?\s)(cdd-ray [^"#]*)', line):
        words = shlex.split(match.group(1))
        if "&&" in words:
            words = words[: words.index("&&")]
        found.append(words)
    return found


def written_commands() -> list[tuple[str, list[str]]]:
    """Every cdd-ray command written in the cluster files: RayJob entrypoints, YAML comments, and
    the shell blocks of the cluster README."""
    found = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        for doc in documents(path):
            if doc.get("kind") == "RayJob":
                found.append((f"{path.name} entrypoint", shlex.split(doc["spec"]["entrypoint"])))
        text = path.read_text().replace("\\\n#", " ")
        for line in text.splitlines():
            command = re.match(r"\s*#\s*(?:[A-Z][a-z]+:\s*)?(cdd-ray .*)", line)
            if command:
                found += [(path.name, words) for words in commands_in_line(command.group(1))]
    in_shell = False
    for line in (CLUSTER / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_shell = line.strip() == "```bash"
        elif in_shell:
            found += [("README.md", words) for words in commands_in_line(line)]
    return found


COMMANDS = written_commands()


def test_the_cluster_files_name_commands_at_all():
    names = {name for name, _ in COMMANDS}
    assert {"rayjob.yaml entrypoint", "rayjob-sweep.yaml entrypoint", "README.md"} <= names


@pytest.mark.parametrize(("where", "words"), COMMANDS, ids=[f"{n}: {' '.join(w)[:60]}" for n, w in COMMANDS])
def test_each_written_command_exists_and_accepts_its_arguments(where, words, monkeypatch, capsys):
    assert words[0] == "cdd-ray", where
    args = [w.replace(IMAGE_ROOT, str(ROOT)) for w in words[1:]]
    if any(a in ("FILE", "URL", "...", "DIR", "RUN_DIR") or a.startswith("<") for a in args):
        pytest.skip(f"{where}: a placeholder, not a command")
    build_parser().parse_args(args)  # unknown subcommands or flags exit here (SystemExit)
    if args[0] in DRY_RUN_COMMANDS:
        monkeypatch.chdir(ROOT)
        # these commands run on the cluster (a job sets RAY_ADDRESS there), not on a local Ray, so
        # --dry-run does not hold them to this machine's CPUs and GPUs
        monkeypatch.setenv("RAY_ADDRESS", "auto")
        extra = [] if "--dry-run" in args else ["--dry-run"]
        command = [args[0], *extra, *args[1:]] if args[0] == "submit" else [*args, *extra]
        assert main(command) == 0, f"{where}: {' '.join(words)} failed:\n{capsys.readouterr().out}"
