"""Static checks of the Ansible deployment: roles, playbooks, inventory, rendered files.

Nothing here touches a remote host. The roles' templates are rendered by the real
``ansible-playbook`` (the project venv's, from ``sys.prefix``) on localhost, with each
role's defaults and internal vars, and the results are checked by the tools that read
them on a real host: the daemons' own config loaders, ``systemd-analyze verify``,
``promtool`` and ``amtool``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tomllib
import typing
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshblock import pki
from meshblock.config import load as load_config
from meshblock.mdm.config import MdmConfig
from meshblock.mgmt.config import MgmtConfig
from meshblock.mgmt.inventory import actions_link
from meshblock.sdc.config import SdcConfig, nbd_tcp_policy
from meshblock.sdc.config import cluster_secret as sdc_cluster_secret
from meshblock.sds.config import SdsConfig
from meshblock.sds.config import load as load_sds_config

pytestmark = [pytest.mark.cluster, pytest.mark.parallel]

ROOT = Path(__file__).resolve().parent.parent
ROLES_DIR = ROOT / "roles"
PLAYBOOKS_DIR = ROOT / "playbooks"
EXAMPLE_INVENTORY = ROOT / "inventory" / "example"
BIN = Path(sys.prefix) / "bin"

ROLES = ["common", "mdm", "sds", "sdc", "mgmt", "prometheus", "alertmanager"]
DAEMON_ROLES = ["mdm", "sds", "sdc", "mgmt"]
PLAYBOOKS = sorted(p.name for p in PLAYBOOKS_DIR.glob("*.yml"))

# argument_specs type -> the Python types a default of that type may have.
SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "path": (str,),
    "int": (int,),
    "float": (float,),
    "bool": (bool,),
    "list": (list,),
    "dict": (dict,),
}

# Secrets the render uses; long enough for the roles' preflight asserts.
SECRETS = {
    "mdm_admin_token": "admin-token-0123456789abcdef",
    "mdm_readonly_token": "readonly-token-0123456789abcdef",
    "metrics_read_token": "metrics-token-0123456789abcdef",
    "mdm_cluster_secret": "cluster-secret-0123456789abcdef",
    "sds_cluster_secret": "cluster-secret-0123456789abcdef",
    "sdc_cluster_secret": "cluster-secret-0123456789abcdef",
    "mgmt_webhook_token": "webhook-token-0123456789abcdef",
    "mgmt_admin_password": "admin-password-0123",
    "alertmanager_webhook_token": "webhook-token-0123456789abcdef",
}

# The SDC's identity when neither sdc_guid nor a kept GUID is there: Ansible's to_uuid
# of its inventory name (roles/sdc/vars/main.yml).
SDC_SOCKET = "/run/meshblock-sdc/nbd.sock"
SDC1_GUID = str(uuid.uuid5(uuid.UUID("361E6D51-FAEC-444A-9079-341386DA8E2E"), "sdc1"))
# The certificates the roles install on each host (common's tls.yml), made for the
# render by a CA of the test's own: the daemons' config loaders read them.
TLS_IDENTITIES = (
    "mdm:mdm1",
    "sds:sds1",
    "sds:sds2",
    f"sdc:{SDC1_GUID}",
    "mgmt:mgmt1",
    "admin:mgmt-mgmt1",  # MGMT's admin certificate (mgmt_manage_cluster, tls_client.yml)
)
PROMETHEUS_ID = "mgmt:prometheus-mon1"

DAEMON_BINARIES = [
    "meshblock-mdm",
    "meshblock-sds",
    "meshblock-sdc",
    "meshblock-mgmt",
    "meshblock-nbd-helper",
    "meshctl",
]


def ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env["ANSIBLE_CONFIG"] = str(ROOT / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("ANSIBLE_VAULT_PASSWORD_FILE", None)
    return env


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=ROOT, env=ansible_env(), capture_output=True, text=True, check=False, **kw
    )


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def tool(name: str) -> str:
    """A system tool the checks need; missing means the test machine is incomplete."""
    found = shutil.which(name)
    assert found, f"{name} is not installed (Debian packages: systemd, prometheus, ...)"
    return found


# -- roles: argument_specs against defaults -------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_role_layout(role: str) -> None:
    base = ROLES_DIR / role
    for rel in ("defaults/main.yml", "meta/main.yml", "meta/argument_specs.yml", "tasks/main.yml"):
        assert (base / rel).is_file(), f"roles/{role}/{rel} is missing"
    # tasks/main.yml only lists the phases, each tagged with its name.
    phases = read_yaml(base / "tasks" / "main.yml")
    tags = {t for task in phases for t in task.get("tags", [])}
    assert tags <= {"preflight", "install", "config", "service"}, tags
    assert "preflight" in tags and "install" in tags
    for task in phases:
        assert "ansible.builtin.import_tasks" in task, task


@pytest.mark.parametrize("role", ROLES)
def test_argument_specs_agree_with_defaults(role: str) -> None:
    defaults = read_yaml(ROLES_DIR / role / "defaults" / "main.yml") or {}
    specs = read_yaml(ROLES_DIR / role / "meta" / "argument_specs.yml")
    options = specs["argument_specs"]["main"]["options"]
    assert sorted(defaults) == sorted(options), (
        f"roles/{role}: defaults/main.yml and meta/argument_specs.yml name different "
        f"variables: only in defaults {sorted(set(defaults) - set(options))}, only in "
        f"argument_specs {sorted(set(options) - set(defaults))}"
    )
    for name, value in defaults.items():
        assert name.startswith(f"{role}_"), f"{name} lacks the role prefix {role}_"
        spec = options[name]
        assert spec.get("description"), f"{name} has no description"
        allowed = SPEC_TYPES[spec["type"]]
        if not (isinstance(value, str) and "{{" in value):  # a template is typed when used
            ok = isinstance(value, allowed) and not (
                isinstance(value, bool) and bool not in allowed
            )
            assert ok, f"{name}: default {value!r} is not of type {spec['type']}"
        assert spec.get("default") == value, (
            f"{name}: argument_specs default {spec.get('default')!r} != defaults {value!r}"
        )
        if "choices" in spec:
            assert value in spec["choices"], f"{name}: default not among its choices"


def test_every_role_variable_is_documented() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    missing = [
        name
        for role in ROLES
        for name in read_yaml(ROLES_DIR / role / "defaults" / "main.yml") or {}
        if f"`{name}`" not in doc
    ]
    assert not missing, f"docs/deployment.md does not describe {missing}"


@pytest.mark.parametrize("role", ROLES)
def test_internal_vars_are_prefixed(role: str) -> None:
    path = ROLES_DIR / role / "vars" / "main.yml"
    names = list(read_yaml(path) or {}) if path.exists() else []
    for name in names:
        assert name.startswith(f"_{role}_"), f"roles/{role}/vars: {name} must start _{role}_"


# -- lint and syntax --------------------------------------------------------------------


def test_ansible_lint_production_profile() -> None:
    proc = run(
        [
            str(BIN / "ansible-lint"),
            "--nocolor",
            "--offline",
            "--profile",
            "production",
            "roles",
            "playbooks",
            "inventory/example",
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax(playbook: str) -> None:
    proc = run(
        [
            str(BIN / "ansible-playbook"),
            "--syntax-check",
            "-i",
            str(EXAMPLE_INVENTORY),
            str(PLAYBOOKS_DIR / playbook),
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_site_has_one_play_per_group_in_order() -> None:
    """One play per group in dependency order, and after the SDSs' the play that
    restarts the changed ones one at a time (docs/deployment.md, "Rolling restarts")."""
    plays = read_yaml(PLAYBOOKS_DIR / "site.yml")
    assert [p["hosts"] for p in plays] == ["mdm", "sds", "sds", "sdc", "mgmt", "monitoring"]
    deploy, restart = plays[1], plays[2]
    assert deploy["vars"]["sds_restart_strategy"] == "rolling"
    assert restart["serial"] == 1 and restart["any_errors_fatal"] is True


def test_example_inventory_keeps_secrets_out() -> None:
    """Every secret in the example inventory is a placeholder, none is a literal."""
    all_vars = read_yaml(EXAMPLE_INVENTORY / "group_vars" / "all.yml")
    for name in SECRETS:
        assert name in all_vars, f"group_vars/all.yml does not set {name}"
        assert str(all_vars[name]).startswith("{{ vault_"), f"{name} is not a vault placeholder"
    proc = run([str(BIN / "ansible-inventory"), "-i", str(EXAMPLE_INVENTORY), "--graph"])
    assert proc.returncode == 0, proc.stderr
    for group in ("mdm", "sds", "sdc", "mgmt", "monitoring"):
        assert f"@{group}:" in proc.stdout, proc.stdout


SECRET_VARS = re.compile(
    r"\b(mdm_admin_token|mdm_readonly_token|mdm_cluster_secret|sds_cluster_secret"
    r"|sdc_cluster_secret|mgmt_webhook_token|mgmt_admin_password|alertmanager_webhook_token"
    r"|mdm_database_url|mgmt_database_url|_mdm_meshctl_env|day2_meshctl_env"
    r"|sds_join_admin_token)\b"
)


def test_secret_tasks_have_no_log() -> None:
    """A task that uses a secret variable, or templates a file that does, has no_log."""
    files = list(ROLES_DIR.glob("*/tasks/*.yml")) + list(PLAYBOOKS_DIR.glob("*.yml"))
    checked = 0
    for path in files:
        role_dir = path.parent.parent
        for task in iter_tasks(read_yaml(path) or []):
            body = {k: v for k, v in task.items() if k not in ("name", "no_log")}
            args = body.get("ansible.builtin.assert")
            if isinstance(args, dict):
                body["ansible.builtin.assert"] = {k: v for k, v in args.items() if k != "fail_msg"}
            text = json.dumps(body)
            template = body.get("ansible.builtin.template")
            if isinstance(template, dict):
                for src in (role_dir / "templates").glob(re.sub(r"{{.*?}}", "*", template["src"])):
                    text += src.read_text()
            if SECRET_VARS.search(text):
                checked += 1
                assert task.get("no_log") is True, f"{path}: task {task.get('name')!r}"
    assert checked >= 15, checked


def iter_tasks(items: list[dict[str, Any]]) -> typing.Iterator[dict[str, Any]]:
    for item in items:
        for key in ("tasks", "pre_tasks", "post_tasks", "handlers", "block"):
            yield from iter_tasks(item.get(key) or [])
        if not any(k in item for k in ("hosts", "block")):
            yield item


# -- the wheelhouse without a package index (air-gapped sites) ------------------------

# A build backend of a few lines, as the wheel "tinybackend": what an operator's
# prepared directory holds for meshblock (setuptools, wheel) in small. Its write_wheel
# also makes the test's wheels.
TINY_BACKEND = """
import base64, hashlib, zipfile

def write_wheel(directory, name, version, files, requires=()):
    dist = f"{name}-{version}.dist-info"
    meta = f"Metadata-Version: 2.1\\nName: {name}\\nVersion: {version}\\n"
    meta += "".join(f"Requires-Dist: {r}\\n" for r in requires)
    files = {**files, f"{dist}/METADATA": meta,
             f"{dist}/WHEEL": "Wheel-Version: 1.0\\nGenerator: tiny\\n"
                              "Root-Is-Purelib: true\\nTag: py3-none-any\\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
        record.append(f"{path},sha256={digest.decode().rstrip('=')},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    wheel = f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(f"{directory}/{wheel}", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{dist}/RECORD", "\\n".join(record) + "\\n")
    return wheel

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return write_wheel(wheel_directory, "tiny", "1.0", {"tiny/__init__.py": ""}, ["tinydep"])
"""


def build_wheelhouse(tmp: Path, **role_vars: str) -> subprocess.CompletedProcess[str]:
    """Run the common role's own tasks/wheelhouse.yml with ansible-playbook on localhost
    for a small project in ``tmp`` (build backend "tinybackend", dependency "tinydep"),
    with no package index reachable: pip's configuration files and PIP_* variables of
    this machine are left out and PIP_INDEX_URL is a closed local port."""
    project = tmp / "tiny"
    project.mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["tinybackend"]\nbuild-backend = "tinybackend"\n'
    )
    play = [
        {
            "name": "Build the wheelhouse",
            "hosts": "localhost",
            "connection": "local",
            "gather_facts": False,
            "vars": {
                "common_project_dir": str(project),
                "common_build_dir": str(tmp / "wheelhouse"),
                "common_build_python": sys.executable,
                "ansible_python_interpreter": sys.executable,
                **role_vars,
            },
            "tasks": [
                {
                    "name": "Build",
                    "ansible.builtin.import_role": {
                        "name": "common",
                        "tasks_from": "wheelhouse.yml",
                    },
                },
                {"name": "Show", "ansible.builtin.debug": {"var": "_common_pip_wheel_argv"}},
            ],
        }
    ]
    (tmp / "build.yml").write_text(yaml.safe_dump(play, sort_keys=False))
    env = {k: v for k, v in ansible_env().items() if not k.startswith("PIP_")}
    env.update(
        PIP_CONFIG_FILE=os.devnull,
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_RETRIES="0",
        PIP_TIMEOUT="5",
    )
    return subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", str(tmp / "build.yml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def test_the_wheelhouse_builds_from_prepared_wheels_without_an_index(tmp_path: Path) -> None:
    """common_wheelhouse_src: the controller's pip wheel runs with --no-index
    --find-links DIR, so the build backend and the dependencies come from the
    operator's wheels and no index is asked; the same build without it fails here,
    having no index to reach."""
    backend: dict[str, Any] = {}
    exec(TINY_BACKEND, backend)  # the test's own source, above
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    backend["write_wheel"](prepared, "tinybackend", "1.0", {"tinybackend.py": TINY_BACKEND})
    backend["write_wheel"](prepared, "tinydep", "2.0", {"tinydep.py": ""})

    proc = build_wheelhouse(tmp_path / "gapped", common_wheelhouse_src=str(prepared))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = re.findall(r"^    - (.*)$", proc.stdout, re.M)  # the Show task's list
    assert argv[argv.index("--no-index") + 1 :][:2] == ["--find-links", str(prepared)], argv
    built = sorted(w.name for w in (tmp_path / "gapped" / "wheelhouse").glob("*.whl"))
    assert built == ["tiny-1.0-py3-none-any.whl", "tinydep-2.0-py3-none-any.whl"], built

    online = build_wheelhouse(tmp_path / "online")  # pip would need its index
    assert online.returncode != 0, online.stdout
    assert "tinybackend" in online.stdout and "--no-index" not in online.stdout, online.stdout

    empty = tmp_path / "empty"
    empty.mkdir()
    refused = build_wheelhouse(tmp_path / "none", common_wheelhouse_src=str(empty))
    assert refused.returncode != 0 and "holds no wheel" in refused.stdout, refused.stdout


# -- rendering with ansible -------------------------------------------------------------

RENDER_INVENTORY: dict[str, Any] = {
    "all": {
        "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable},
        "children": {
            "mdm": {"hosts": {"mdm1": {"ansible_host": "10.9.0.10"}}},
            "sds": {
                "hosts": {
                    "sds1": {
                        "ansible_host": "10.9.0.11",
                        "sds_protection_domain": "pd1",
                        "sds_fault_set": "fs1",
                    },
                    "sds2": {
                        "ansible_host": "10.9.0.12",
                        "sds_protection_domain": "pd1",
                        "sds_control_port": 17073,
                    },
                }
            },
            "sdc": {"hosts": {"sdc1": {"ansible_host": "10.9.0.21"}}},
            "mgmt": {"hosts": {"mgmt1": {"ansible_host": "10.9.0.30"}}},
            "monitoring": {"hosts": {"mon1": {"ansible_host": "10.9.0.31"}}},
        },
    }
}

# The scrape jobs of monitoring/prometheus/prometheus.yml, each with a target file.
SCRAPE_JOBS = (
    "meshblock_mdm",
    "meshblock_sds",
    "meshblock_sdc",
    "meshblock_mgmt",
    "prometheus",
    "alertmanager",
)

# The repository's rule files, which the prometheus role renders with rules.yml.j2.
RULE_FILES = sorted((ROOT / "monitoring" / "prometheus" / "rules").glob("*.yml"))
# Another runbook and job names: sds renamed, the MDM's and MGMT's jobs swapped (the
# template must not rename twice).
RENAMED: dict[str, Any] = {
    "prometheus_runbook_url_base": "https://wiki.example.org/ops/meshblock-runbook",
    "prometheus_job_names": {
        "meshblock_sds": "storage-sds",
        "meshblock_mdm": "meshblock_mgmt",
        "meshblock_mgmt": "meshblock_mdm",
    },
}

# name -> (inventory host, roles whose defaults and vars apply, templates, extra vars)
VARIANTS: dict[str, tuple[str, list[str], list[str], dict[str, Any]]] = {
    "mdm": ("mdm1", ["common", "mdm"], ["mdm.toml.j2", "meshblock-mdm.service.j2"], {}),
    "sds": (
        "sds1",
        ["common", "sds"],
        ["sds.toml.j2", "meshblock-sds.service.j2"],
        {
            "sds_devices": [
                {"path": "/var/lib/meshblock/sds/dev0.img", "capacity": "8GiB", "pool": "sp1"},
                {"path": "/srv/meshblock/dev1.img", "capacity": 4294967296, "pool": "sp1"},
            ]
        },
    ),
    "sds_block": (
        "sds2",
        ["common", "sds"],
        ["sds.toml.j2", "meshblock-sds.service.j2"],
        {
            "sds_devices": [
                {"path": "/dev/vdb", "capacity": "100GiB", "pool": "sp1", "name": "vdb"},
                {"path": "/dev/vdc", "capacity": "100GiB", "pool": "sp2"},
            ]
        },
    ),
    # common_tls false: the opt-out renders no [tls] and plain URLs.
    "sds_plain": (
        "sds1",
        ["common", "sds"],
        ["sds.toml.j2"],
        {
            "common_tls": False,
            "sds_devices": [{"path": "/srv/dev0.img", "capacity": "8GiB", "pool": "sp1"}],
        },
    ),
    "sdc": ("sdc1", ["common", "sdc"], ["sdc.toml.j2", "meshblock-sdc.service.j2"], {}),
    "sdc_attach": (
        "sdc1",
        ["common", "sdc"],
        [
            "sdc.toml.j2",
            "meshblock-sdc.service.j2",
            "meshblock-nbd-helper.socket.j2",
            "meshblock-nbd-helper@.service.j2",
        ],
        {
            "__sdc_nbd_module": {"stat": {"exists": True}},
            "sdc_nbd_unix_socket": "/run/x/nbd",
            "sdc_nbd_socket_group": "nbdusers",
        },
    ),
    # NBD over TCP opted in: TLS with the SDC's certificate (sdc_nbd_tls follows common_tls),
    # TLS 1.2 admitted for nbd-client.
    "sdc_tcp": (
        "sdc1",
        ["common", "sdc"],
        ["sdc.toml.j2"],
        {
            "sdc_nbd_tcp": True,
            "sdc_nbd_host": "0.0.0.0",
            "sdc_nbd_tcp_allow": ["127.0.0.0/8", "10.9.0.0/24 db-*"],
            "sdc_nbd_tls_min_version": "1.2",
        },
    ),
    "mgmt": ("mgmt1", ["common", "mgmt"], ["mgmt.toml.j2", "meshblock-mgmt.service.j2"], {}),
    "mgmt_plain": ("mgmt1", ["common", "mgmt"], ["mgmt.toml.j2"], {"common_tls": False}),
    "mgmt_read_only": (
        "mgmt1",
        ["common", "mgmt"],
        ["mgmt.toml.j2"],
        {"mgmt_manage_cluster": False},
    ),
    # An admin certificate of the operator's own instead of the role's.
    "mgmt_own_cert": (
        "mgmt1",
        ["common", "mgmt"],
        ["mgmt.toml.j2"],
        {"mgmt_mdm_admin_cert": "/srv/own.crt", "mgmt_mdm_admin_key": "/srv/own.key"},
    ),
    "prometheus": (
        "mon1",
        ["prometheus"],
        ["prometheus.yml.j2"] + [f"targets/{job}.yml.j2" for job in SCRAPE_JOBS],
        {},
    ),
    "alertmanager": ("mon1", ["alertmanager"], ["alertmanager.yml.j2"], {}),
    # The host lab's short group_wait.
    "alertmanager_lab": (
        "mon1",
        ["alertmanager"],
        ["alertmanager.yml.j2"],
        {
            k: v
            for k, v in read_yaml(ROOT / "inventory" / "lab" / "group_vars" / "all.yml").items()
            if k.startswith("alertmanager_") and "token" not in k
        },
    ),
    # Each rule file, as the role installs it by default and with RENAMED.
    **{
        f"prometheus_rules_{path.stem}": (
            "mon1",
            ["prometheus"],
            ["rules.yml.j2"],
            {"_prometheus_rule_file": str(path)},
        )
        for path in RULE_FILES
    },
    **{
        f"prometheus_renamed_rules_{path.stem}": (
            "mon1",
            ["prometheus"],
            ["rules.yml.j2"],
            {"_prometheus_rule_file": str(path), **RENAMED},
        )
        for path in RULE_FILES
    },
    "prometheus_renamed": ("mon1", ["prometheus"], ["prometheus.yml.j2"], RENAMED),
    # An existing Prometheus: meshblock's jobs in a file its prometheus.yml includes.
    "prometheus_include": (
        "mon1",
        ["prometheus"],
        ["scrape_configs.yml.j2"] + [f"targets/{job}.yml.j2" for job in SCRAPE_JOBS],
        {"prometheus_manage_config": False},
    ),
    # The host lab's short intervals (inventory/lab/group_vars/all.yml).
    "prometheus_lab": (
        "mon1",
        ["prometheus"],
        ["prometheus.yml.j2"],
        {
            k: v
            for k, v in read_yaml(ROOT / "inventory" / "lab" / "group_vars" / "all.yml").items()
            if k.startswith("prometheus_")
        },
    ),
}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Render every variant's templates with ansible-playbook; name -> output dir."""
    tmp = tmp_path_factory.mktemp("ansible-render")
    venv = tmp / "venv"  # stub binaries: systemd-analyze wants ExecStart to exist
    (venv / "bin").mkdir(parents=True)
    for name in DAEMON_BINARIES:
        stub = venv / "bin" / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    (tmp / "inventory.yml").write_text(yaml.safe_dump(RENDER_INVENTORY))
    plays = []
    for name, (host, roles, templates, extra) in VARIANTS.items():
        out = tmp / name
        out.mkdir()
        # The roles' defaults and internal vars, as play vars under the overrides.
        role_vars: dict[str, Any] = {}
        for role in roles:
            for sub in ("defaults", "vars"):
                f = ROLES_DIR / role / sub / "main.yml"
                if f.exists():
                    role_vars.update(read_yaml(f) or {})
        # ... except what the inventory sets for the host (role defaults rank below it).
        inventory_host = next(
            group["hosts"][host]
            for group in RENDER_INVENTORY["all"]["children"].values()
            if host in group["hosts"]
        )
        role_vars = {k: v for k, v in role_vars.items() if k not in inventory_host}
        tasks = [
            {
                "name": f"Render {t}",
                "ansible.builtin.template": {
                    "src": str(ROLES_DIR / roles[-1] / "templates" / t),
                    "dest": str(out / t.removesuffix(".j2")),
                    "mode": "0644",
                },
            }
            for t in templates
        ]
        for t in templates:
            (out / t).parent.mkdir(parents=True, exist_ok=True)
        plays.append(
            {
                "name": f"Render {name}",
                "hosts": host,
                "gather_facts": False,
                "vars": {
                    **role_vars,
                    **extra,
                    "common_venv_dir": str(venv),
                    "common_config_dir": str(tmp / "etc"),
                    "sds_cluster_secret_file": str(tmp / "etc" / "sds-cluster.secret"),
                    "sdc_cluster_secret_file": str(tmp / "etc" / "sdc-cluster.secret"),
                    "common_tls_dir": str(tmp / "etc" / "tls"),
                    # Prometheus's certificate (promtool checks that the files exist)
                    "prometheus_config_dir": str(tmp / "prometheus"),
                    "prometheus_monitoring_dir": str(ROOT / "monitoring"),
                    "alertmanager_monitoring_dir": str(ROOT / "monitoring"),
                },
                "tasks": tasks,
            }
        )
    (tmp / "etc").mkdir()
    make_tls(tmp / "etc" / "tls", tmp / "prometheus" / "meshblock-tls")
    for daemon in ("sds", "sdc"):
        (tmp / "etc" / f"{daemon}-cluster.secret").write_text(SECRETS["sds_cluster_secret"])
    (tmp / "render.yml").write_text(yaml.safe_dump(plays, sort_keys=False))
    (tmp / "secrets.json").write_text(json.dumps(SECRETS))
    proc = run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            str(tmp / "inventory.yml"),
            "-e",
            f"@{tmp / 'secrets.json'}",
            str(tmp / "render.yml"),
        ]
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {name: tmp / name for name in VARIANTS}


def make_tls(out: Path, prometheus: Path) -> None:
    """A CA, its CRL and each daemon's certificate in ``out``, Prometheus's in
    ``prometheus``, named as the roles name them."""
    ca = pki.Ca.init(out / "ca")
    ca_cert = ca.load()[0]
    for text, where in [(t, out) for t in TLS_IDENTITIES] + [(PROMETHEUS_ID, prometheus)]:
        identity = pki.Identity.parse(text)
        cert, key = ca.issue(identity)
        pki.write_identity(where, identity, cert, key, ca_cert)
    shutil.copy(ca.crl_path, out / "crl.pem")


def dataclass_keys(cls: type, prefix: str = "") -> set[str]:
    """Every key a TOML file of ``cls`` can hold, dotted (``api.port``)."""
    keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            keys |= dataclass_keys(hint, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            keys.add(prefix + f.name)
    return keys


def toml_keys(doc: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for k, v in doc.items():
        if isinstance(v, dict):
            keys |= toml_keys(v, f"{prefix}{k}.")
        else:
            keys.add(prefix + k)
    return keys


def test_mdm_config_loads(rendered: dict[str, Path]) -> None:
    path = rendered["mdm"] / "mdm.toml"
    doc = tomllib.loads(path.read_text())
    config = load_config(MdmConfig, path)
    assert config.auth.admin_token == SECRETS["mdm_admin_token"]
    assert config.auth.cluster_secret == SECRETS["mdm_cluster_secret"]
    assert config.api.port == 6611
    # Every key of the daemon's configuration is set by a role variable, [tls] included
    # (here and in the SDS's, SDC's and MGMT's configs): the roles deploy TLS everywhere,
    # each daemon with the certificate of its own identity (docs/deployment.md, "TLS").
    assert toml_keys(doc) == dataclass_keys(MdmConfig)
    assert_tls(config.tls, "mdm-mdm1")
    assert config.tls.client_certs == "required"


def assert_tls(tls: Any, stem: str) -> None:
    """``[tls]`` names the host's certificate and key, the CA and the CRL that common's
    tls.yml installs, and the certificate names the identity."""
    base = Path(tls.cert).parent
    assert (tls.cert, tls.key) == (str(base / f"{stem}.crt"), str(base / f"{stem}.key"))
    assert (tls.ca, tls.crl) == (str(base / "ca.crt"), str(base / "crl.pem"))
    identity = pki.identity_of(pki.load_cert(Path(tls.cert)))
    assert str(identity) == stem.replace("-", ":", 1)


def without_tls(keys: set[str]) -> set[str]:
    """The keys but those of [tls], which the roles leave out with common_tls false."""
    return {k for k in keys if not k.startswith("tls.")}


@pytest.mark.parametrize("variant", ["sds", "sds_block"])
def test_sds_config_loads(rendered: dict[str, Path], variant: str) -> None:
    path = rendered[variant] / "sds.toml"
    doc = tomllib.loads(path.read_text())
    config = load_sds_config(path)
    assert config.secret() == SECRETS["sds_cluster_secret"]
    assert config.mdm_urls == ("https://10.9.0.10:6611",)
    assert config.data.tls is True
    assert_tls(config.tls, "sds-sds1" if variant == "sds" else "sds-sds2")
    assert config.protection_domain == "pd1"
    assert config.name == ("sds1" if variant == "sds" else "sds2")
    assert config.fault_set == ("fs1" if variant == "sds" else None)
    assert config.address == ("10.9.0.11" if variant == "sds" else "10.9.0.12")
    keys = toml_keys({k: v for k, v in doc.items() if k != "devices"}) | {"devices"}
    # test_faults enables the store's test-only fault hook: the role never writes it
    assert "test_faults" not in keys
    # join_token: the role writes join_token_file instead (as for the cluster secret)
    expected = dataclass_keys(SdsConfig) - {
        "cluster_secret",
        "join_token",
        "test_faults",
    }
    if variant == "sds_block":
        expected -= {"fault_set"}  # written only when set
    assert keys == expected
    assert [d.capacity_bytes for d in config.devices] == (
        [8 << 30, 4 << 30] if variant == "sds" else [100 << 30, 100 << 30]
    )


def test_tls_opt_out_renders_plain_configs(rendered: dict[str, Path]) -> None:
    """common_tls false: no [tls], plain http:// MDM URLs, MGMT on plain HTTP without
    Secure cookies (a lab behind a proxy; docs/deployment.md, "TLS")."""
    path = rendered["sds_plain"] / "sds.toml"
    config = load_sds_config(path)
    assert config.mdm_urls == ("http://10.9.0.10:6611",)
    assert not {k for k in toml_keys(tomllib.loads(path.read_text())) if k.startswith("tls.")}
    path = rendered["mgmt_plain"] / "mgmt.toml"
    mgmt = load_config(MgmtConfig, path)
    assert mgmt.mdm.url == "http://10.9.0.10:6611"
    assert mgmt.http.plain_http is True and mgmt.auth.secure_cookies is False
    assert toml_keys(tomllib.loads(path.read_text())) == without_tls(dataclass_keys(MgmtConfig))


@pytest.mark.parametrize("variant", ["sdc", "sdc_attach", "sdc_tcp"])
def test_sdc_config_loads(rendered: dict[str, Path], variant: str) -> None:
    path = rendered[variant] / "sdc.toml"
    doc = tomllib.loads(path.read_text())
    config = load_config(SdcConfig, path)
    assert sdc_cluster_secret(config) == SECRETS["sdc_cluster_secret"]
    assert config.mdm.urls == ["https://10.9.0.10:6611"]
    assert config.nbd.attach_nbd is (variant == "sdc_attach")
    # where it attaches, through the privileged helper's socket (not CAP_SYS_ADMIN)
    helper = "/run/meshblock-nbd-helper.sock" if variant == "sdc_attach" else ""
    assert config.nbd.attach_helper == helper
    assert config.sdc.name == "sdc1"
    assert config.io.tls is True
    assert_tls(config.tls, f"sdc-{SDC1_GUID}")
    assert toml_keys(doc) == dataclass_keys(SdcConfig) - {"mdm.cluster_secret"}
    # NBD: the unix socket only by default; TCP, where opted in, is TLS with an allow list.
    assert config.nbd.unix_socket == ("/run/x/nbd" if variant == "sdc_attach" else SDC_SOCKET)
    assert (config.nbd.tcp, config.nbd.tls) == (
        (True, True) if variant == "sdc_tcp" else (False, False)
    )
    assert config.nbd.tls_min_version == ("1.2" if variant == "sdc_tcp" else "1.3")
    if variant == "sdc_tcp":
        assert config.nbd.host == "0.0.0.0"
        assert config.nbd.tls_client_certs == "required"
        policy = nbd_tcp_policy(config)  # the SDC's certificate, key and CA load
        assert policy.tls is not None and policy.allow is not None
        assert policy.tls.minimum_version == ssl.TLSVersion.TLSv1_2
        assert [str(r.network) for r in policy.allow] == ["127.0.0.0/8", "10.9.0.0/24"]


def test_mgmt_config_loads(rendered: dict[str, Path]) -> None:
    path = rendered["mgmt"] / "mgmt.toml"
    doc = tomllib.loads(path.read_text())
    config = load_config(MgmtConfig, path)
    assert config.auth.webhook_token == SECRETS["mgmt_webhook_token"]
    assert config.mdm.url == "https://10.9.0.10:6611"
    assert config.prometheus.url == "http://10.9.0.31:9090"
    assert config.alertmanager.url == "http://10.9.0.31:9093"
    # HTTPS with its own certificate (which it also presents to the MDM), Secure cookies
    assert config.http.plain_http is False
    assert config.auth.secure_cookies is True
    assert_tls(config.tls, "mgmt-mgmt1")
    assert toml_keys(doc) == dataclass_keys(MgmtConfig)
    # mgmt_manage_cluster (on by default): the admin certificate the role issued MGMT,
    # which MGMT loads for its cluster pages' actions as admin:mgmt-mgmt1.
    tls_dir = Path(config.tls.cert).parent
    assert config.mdm.admin_cert == str(tls_dir / "admin-mgmt-mgmt1.crt")
    assert config.mdm.admin_key == str(tls_dir / "admin-mgmt-mgmt1.key")
    assert config.mdm.admin_token_file == ""
    found = actions_link(config)
    assert found is not None and found[2] == "admin:mgmt-mgmt1"


def test_mgmt_admin_credential_off_own_or_without_tls(rendered: dict[str, Path]) -> None:
    """mgmt_manage_cluster false, and without TLS (nothing to issue): no admin
    credential, the pages only read; an operator's own certificate is rendered as given."""
    for variant in ("mgmt_read_only", "mgmt_plain"):
        config = load_config(MgmtConfig, rendered[variant] / "mgmt.toml")
        mdm = config.mdm
        assert (mdm.admin_cert, mdm.admin_key, mdm.admin_token_file) == ("", "", ""), variant
        assert actions_link(config) is None, variant
    own = load_config(MgmtConfig, rendered["mgmt_own_cert"] / "mgmt.toml").mdm
    assert (own.admin_cert, own.admin_key) == ("/srv/own.crt", "/srv/own.key")


def test_mgmt_admin_certificate_tasks() -> None:
    """MGMT's admin certificate goes through common's tls_client.yml like the hosts'
    own certificates: issued on the controller with the same renewal and re-issue
    knobs, the key copied root:meshblock 0640, removed and revoked when not wanted."""
    config = read_yaml(ROLES_DIR / "mgmt" / "tasks" / "config.yml")
    names = [t["name"] for t in config]
    (task,) = [t for t in config if t.get("ansible.builtin.import_role", {}).get("tasks_from")
               == "tls_client.yml"]  # fmt: skip
    assert names.index(task["name"]) < names.index("Write /etc/meshblock/mgmt.toml")
    assert task["vars"]["_common_tls_client_identity"] == "{{ mgmt_mdm_admin_identity }}"
    assert "_mgmt_admin_issued" in task["vars"]["_common_tls_client_state"]
    assert task["vars"]["_common_tls_group"] == "{{ common_group }}"
    client = read_yaml(ROLES_DIR / "common" / "tasks" / "tls_client.yml")
    issue = client[0]["ansible.builtin.command"]["argv"]
    for knob in ("common_tls_renew_days", "common_tls_reissue", "common_tls_cert_days"):
        assert knob in issue, knob
    (copy,) = [
        t
        for t in client
        if "ansible.builtin.copy" in t and t.get("loop") and "delegate_to" not in t
    ]
    assert copy["ansible.builtin.copy"]["group"] == "{{ _common_tls_group }}"
    assert {"ext": "key", "mode": "0640"} in copy["loop"]
    assert copy["notify"] == "meshblock certificate changed"
    revoke = next(
        t for t in client if "revoke" in t.get("ansible.builtin.command", {}).get("argv", [])
    )
    assert revoke["when"] == "_common_tls_client_state == 'absent'"
    assert revoke["throttle"] == 1  # each revocation rewrites crl.pem
    # the CRL goes to the MDMs in the same run, not at their play's next one
    to_mdms = next(t for t in client if t.get("delegate_to") == "{{ item }}")
    assert "groups['mdm']" in to_mdms["loop"]
    assert to_mdms["ansible.builtin.copy"]["dest"] == "{{ _common_tls_dir }}/crl.pem"


UNITS = [
    ("mdm", "meshblock-mdm.service"),
    ("sds", "meshblock-sds.service"),
    ("sds_block", "meshblock-sds.service"),
    ("sdc", "meshblock-sdc.service"),
    ("sdc_attach", "meshblock-sdc.service"),
    ("mgmt", "meshblock-mgmt.service"),
]


def unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize(("variant", "unit"), UNITS)
def test_unit_verifies_and_is_hardened(rendered: dict[str, Path], variant: str, unit: str) -> None:
    path = rendered[variant] / unit
    proc = subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if str(path) in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
    s = unit_settings(path)
    assert s["User"] == ["meshblock"] and s["Group"] == ["meshblock"]
    assert s["Restart"] == ["on-failure"]
    for key, value in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
    ):
        assert s.get(key) == [value], f"{unit}: {key}={s.get(key)}"
    daemon = unit.split("-")[1].split(".")[0]
    assert f"/var/lib/meshblock/{daemon}" in s["ReadWritePaths"]
    assert path.read_text().startswith("#"), "the unit starts with ansible_managed"
    # Issue 13 item 6: in every unit (docs/deployment.md, the scores)
    for key, value in (
        ("ProtectProc", "invisible"),
        ("PrivateMounts", "yes"),
        ("RemoveIPC", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallErrorNumber", "EPERM"),
        ("CapabilityBoundingSet", ""),
    ):
        assert s.get(key) == [value], f"{unit}: {key}={s.get(key)}"
    # the SDS reads /proc/sys/kernel/random/boot_id: not in ProcSubset=pid's /proc
    assert s.get("ProcSubset") == (None if daemon == "sds" else ["pid"]), unit
    if daemon == "sdc":  # no devices and no capability, with or without attach_nbd
        assert s["PrivateDevices"] == ["yes"] and "AmbientCapabilities" in s
        assert s["AmbientCapabilities"] == [""] and "DeviceAllow" not in s
        assert s["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    if variant == "sdc_attach":
        assert s["SupplementaryGroups"] == ["nbdusers"]  # the socket's group only
        assert "-/run/x" in s["ReadWritePaths"]
    if variant == "sdc":  # the NBD socket's default directory
        assert s["RuntimeDirectory"] == ["meshblock-sdc"]
    if variant == "sds_block":
        assert s["DeviceAllow"] == ["/dev/vdb rw", "/dev/vdc rw"]
    if variant == "sds":
        assert "/srv/meshblock" in s["ReadWritePaths"]


def test_attach_helper_units(rendered: dict[str, Path]) -> None:
    """sdc_attach: the helper's socket (root, the SDC's group, one process per
    connection) and its service (CAP_SYS_ADMIN only, nbd devices only, no IP), which
    points nbd-client at the SDC's own NBD socket; systemd-analyze verifies both."""
    out = rendered["sdc_attach"]
    socket_unit, service = (
        out / "meshblock-nbd-helper.socket",
        out / "meshblock-nbd-helper@.service",
    )
    proc = subprocess.run(
        [tool("systemd-analyze"), "verify", "--man=no", str(socket_unit), str(service)],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if str(out) in line]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr
    sock = unit_settings(socket_unit)
    assert sock["ListenStream"] == ["/run/meshblock-nbd-helper.sock"]
    assert sock["Accept"] == ["yes"] and sock["SocketMode"] == ["0660"]
    assert sock["SocketUser"] == ["root"] and sock["SocketGroup"] == ["meshblock"]
    s = unit_settings(service)
    assert "User" not in s  # root, but with one capability
    assert s["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN"] and "AmbientCapabilities" not in s
    assert s["ExecStart"][0].split()[1:] == [
        "--nbd-socket", "/run/x/nbd", "--user", "meshblock", "--nbd-client", "nbd-client",
    ]  # fmt: skip
    assert s["StandardInput"] == ["socket"]
    assert s["SupplementaryGroups"] == ["nbdusers"]  # to open the SDC's 0660 socket
    for key, value in (
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("DevicePolicy", "closed"),
        ("DeviceAllow", "block-nbd rw"),
        ("RestrictAddressFamilies", "AF_UNIX AF_NETLINK"),
        ("SystemCallFilter", "@system-service"),
        ("MemoryDenyWriteExecute", "yes"),
        ("ProtectProc", "invisible"),
        ("PrivateMounts", "yes"),
    ):
        assert s.get(key) == [value], f"{key}={s.get(key)}"


def promtool_check_config(out: Path) -> None:
    """promtool check config on the rendered prometheus.yml in ``out``, with the repo's
    rules beside it, and the token files that the role writes there."""
    shutil.copytree(ROOT / "monitoring" / "prometheus" / "rules", out / "rules")
    (out / "mdm_read_token").write_text("a-read-token\n")
    (out / "metrics_read_token").write_text("a-metrics-token\n")
    proc = subprocess.run(
        [tool("promtool"), "check", "config", str(out / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_config_checks(rendered: dict[str, Path]) -> None:
    """The rendered prometheus.yml, with the repo's rules, passes promtool."""
    out = rendered["prometheus"]
    promtool_check_config(out)
    config = read_yaml(out / "prometheus.yml")
    assert config["global"]["external_labels"] == {"cluster": "meshblock"}
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    assert jobs == set(SCRAPE_JOBS)
    # The MDM, SDSs, SDCs and MGMT serve HTTPS (test_*_config_loads): Prometheus scrapes
    # them so, checks them against the cluster CA and presents its own certificate (the
    # MDM requires one); Prometheus and Alertmanager themselves stay plain HTTP.
    tls_dir = str(out.parent / "prometheus" / "meshblock-tls")
    for job in config["scrape_configs"]:
        if job["job_name"].startswith("meshblock_"):
            assert job["scheme"] == "https", job
            assert job["tls_config"] == {
                "ca_file": f"{tls_dir}/ca.crt",
                "cert_file": f"{tls_dir}/mgmt-prometheus-mon1.crt",
                "key_file": f"{tls_dir}/mgmt-prometheus-mon1.key",
            }, job
        else:
            assert job.get("scheme", "http") == "http" and "tls_config" not in job, job
    mdm_job = next(j for j in config["scrape_configs"] if j["job_name"] == "meshblock_mdm")
    assert mdm_job["authorization"]["credentials_file"] == "mdm_read_token"
    sds = read_yaml(out / "targets" / "meshblock_sds.yml")
    assert sds == [
        {
            "targets": ["10.9.0.11:7073"],
            "labels": {"sds": "sds1", "protection_domain": "pd1", "fault_set": "fs1"},
        },
        {"targets": ["10.9.0.12:17073"], "labels": {"sds": "sds2", "protection_domain": "pd1"}},
    ]
    assert read_yaml(out / "targets" / "meshblock_sdc.yml") == [
        {"targets": ["10.9.0.21:7074"], "labels": {"sdc": "sdc1"}}
    ]
    assert read_yaml(out / "targets" / "alertmanager.yml") == [{"targets": ["10.9.0.31:9093"]}]


def test_lab_prometheus_config_checks(rendered: dict[str, Path]) -> None:
    """The lab inventory's shorter intervals still make a config promtool accepts (its
    scrape timeout may not exceed its scrape interval)."""
    out = rendered["prometheus_lab"]
    promtool_check_config(out)
    assert read_yaml(out / "prometheus.yml")["global"]["scrape_interval"] == "5s"


def promtool_version() -> tuple[int, int]:
    """``promtool --version``'s major and minor (Debian 12's is 2.42)."""
    out = subprocess.run(
        [tool("promtool"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"version (\d+)\.(\d+)", out)
    assert found, out
    return int(found.group(1)), int(found.group(2))


def test_an_existing_prometheus_includes_meshblocks_jobs(rendered: dict[str, Path]) -> None:
    """prometheus_manage_config false: scrape_configs.yml holds the four daemons' jobs
    with absolute paths into prometheus_include_dir, and an operator's own
    prometheus.yml (which scrapes itself as job "prometheus") that includes it and the
    rules passes promtool check config. promtool 2.43 or later reads it through
    scrape_config_files; an older one (Debian 12's 2.42 knows no scrape_config_files)
    checks the same jobs copied under scrape_configs, as docs/monitoring.md tells
    those operators."""
    out = rendered["prometheus_include"]
    include = out / "scrape_configs.yml"
    jobs = read_yaml(include)["scrape_configs"]
    assert [j["job_name"] for j in jobs] == [j for j in SCRAPE_JOBS if j.startswith("meshblock_")]
    where = out.parent / "prometheus" / "meshblock"  # prometheus_config_dir/meshblock
    tls_dir = out.parent / "prometheus" / "meshblock-tls"
    for job in jobs:
        name = job["job_name"]
        assert job["file_sd_configs"] == [{"files": [f"{where}/targets/{name}.yml"]}], job
        token = "mdm_read_token" if name == "meshblock_mdm" else "metrics_read_token"
        assert job["authorization"] == {"type": "Bearer", "credentials_file": f"{where}/{token}"}
        assert job["scheme"] == "https" and job["tls_config"]["ca_file"] == f"{tls_dir}/ca.crt"
        assert (job["scrape_interval"], job["scrape_timeout"]) == ("15s", "10s"), job
    # What the role writes there besides (the rules as the repository has them).
    shutil.copytree(out / "targets", where / "targets", dirs_exist_ok=True)
    shutil.copytree(ROOT / "monitoring" / "prometheus" / "rules", where / "rules")
    (where / "mdm_read_token").write_text("a-read-token\n")
    (where / "metrics_read_token").write_text("a-metrics-token\n")
    own_jobs = [{"job_name": "prometheus", "static_configs": [{"targets": ["localhost:9090"]}]}]
    operator: dict[str, Any] = {
        "global": {"scrape_interval": "1m", "evaluation_interval": "1m"},
        "rule_files": ["/etc/prometheus/rules.d/*.yml", f"{where}/rules/*.yml"],
        "scrape_configs": own_jobs,
    }
    if promtool_version() >= (2, 43):
        operator["scrape_config_files"] = [str(include)]
    else:
        operator["scrape_configs"] = own_jobs + jobs
    main_config = out / "operators-prometheus.yml"
    main_config.write_text(yaml.safe_dump(operator, sort_keys=False))
    proc = subprocess.run(
        [tool("promtool"), "check", "config", str(main_config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = re.findall(r"^  SUCCESS: \d+ rules found$", proc.stdout, re.M)
    assert len(rules) == len(RULE_FILES), proc.stdout


def test_an_existing_prometheus_config_is_never_written_nor_restarted() -> None:
    """With prometheus_manage_config false the role leaves prometheus.yml alone: the one
    task that writes it is conditional on prometheus_manage_config, and no task or
    handler of the role restarts Prometheus (a reload is what picks changes up)."""
    role = ROLES_DIR / "prometheus"
    tasks = [t for f in sorted((role / "tasks").glob("*.yml")) for t in read_yaml(f) or []]
    writers = [
        t
        for t in tasks
        if str(t.get("ansible.builtin.template", {}).get("dest", "")).endswith("/prometheus.yml")
    ]
    assert len(writers) == 1 and writers[0]["when"] == "prometheus_manage_config | bool"
    include = [t for t in tasks if "scrape_configs.yml" in json.dumps(t)]
    assert include and all(t["when"] == "not prometheus_manage_config | bool" for t in include)
    for task in tasks + (read_yaml(role / "handlers" / "main.yml") or []):
        assert "restarted" not in json.dumps(task), task


def test_alertmanager_config_checks(rendered: dict[str, Path]) -> None:
    path = rendered["alertmanager"] / "alertmanager.yml"
    proc = subprocess.run(
        [tool("amtool"), "check-config", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    receiver = next(r for r in read_yaml(path)["receivers"] if r["name"] == "meshblock-mgmt")
    webhook = receiver["webhook_configs"][0]
    assert webhook["url"] == "https://10.9.0.30:8080/api/alerts/webhook"
    assert webhook["http_config"]["tls_config"] == {
        "ca_file": "/etc/prometheus/meshblock-alertmanager-tls/ca.crt"
    }
    assert webhook["http_config"]["authorization"]["credentials_file"] == (
        "/etc/prometheus/meshblock-mgmt-webhook.token"
    )
    assert read_yaml(path)["route"]["group_wait"] == "30s"


def test_lab_alertmanager_group_wait(rendered: dict[str, Path]) -> None:
    """The lab's alertmanager_group_wait reaches route.group_wait, amtool accepts it."""
    path = rendered["alertmanager_lab"] / "alertmanager.yml"
    proc = subprocess.run(
        [tool("amtool"), "check-config", str(path)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert read_yaml(path)["route"]["group_wait"] == "5s"


def test_rules_render_as_in_the_repository(rendered: dict[str, Path]) -> None:
    """By default the role installs the repository's rule files unchanged."""
    assert RULE_FILES
    for path in RULE_FILES:
        out = rendered[f"prometheus_rules_{path.stem}"] / "rules.yml"
        assert read_yaml(out) == read_yaml(path), path.name


def test_rules_render_with_another_runbook_and_job_names(rendered: dict[str, Path]) -> None:
    """prometheus_runbook_url_base and prometheus_job_names reach every rule file and
    the scrape jobs of prometheus.yml, and promtool accepts the result."""
    out = rendered["prometheus_renamed"]
    rules = out / "rules"
    rules.mkdir()
    for path in RULE_FILES:
        shutil.copy(
            rendered[f"prometheus_renamed_rules_{path.stem}"] / "rules.yml", rules / path.name
        )
    (out / "mdm_read_token").write_text("a-read-token\n")
    (out / "metrics_read_token").write_text("a-metrics-token\n")
    for argv in (
        [tool("promtool"), "check", "rules", *map(str, sorted(rules.iterdir()))],
        [tool("promtool"), "check", "config", str(out / "prometheus.yml")],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {**{job: job for job in SCRAPE_JOBS}, **RENAMED["prometheus_job_names"]}
    jobs = {c["job_name"] for c in read_yaml(out / "prometheus.yml")["scrape_configs"]}
    assert jobs == set(names.values())
    base = RENAMED["prometheus_runbook_url_base"]
    exprs: dict[str, str] = {}
    for path in sorted(rules.iterdir()):
        for group in read_yaml(path)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    name = rule["alert"]
                    assert rule["annotations"]["runbook_url"] == f"{base}#{name.lower()}"
                    exprs[name] = " ".join(rule["expr"].split())
    assert exprs["MeshblockSdsTargetDown"] == 'up{job="storage-sds"} == 0'
    assert exprs["MeshblockMdmDown"] == 'up{job="meshblock_mgmt"} == 0'
    assert exprs["MeshblockMgmtDown"] == 'up{job="meshblock_mdm"} == 0'
    selected = set(re.findall(r'job="([^"]*)"', " ".join(exprs.values())))
    assert selected == set(names.values())
    for job, name in names.items():
        assert f'absent(up{{job="{name}"}})' in exprs["MeshblockTargetMissing"], job
