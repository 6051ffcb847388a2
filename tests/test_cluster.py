"""cluster/ agrees with the code it runs: the KubeRay manifests, the cluster-launcher config, the
runtime env, the Dockerfile and the README's "Scaling out" commands name scripts, flags, Serve
arguments, resources and install lines that the jobs, elastic_ray.serving and pyproject.toml accept.

Each check returns the problems it finds. It runs on the files as they are (no problem) and on a
copy with one thing changed, a renamed flag say (the problem is found), so that a rename that
forgets cluster/ fails here rather than on a cluster.
"""

import functools
import importlib
import inspect
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
GPU = "nvidia.com/gpu"

# ray.io/v1 fields, from KubeRay's Go types (ray-operator/apis/ray/v1, 1.6): a key outside these is
# a guess that the API server would reject or drop.
SPEC_FIELDS = {
    "RayCluster": {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
                   "upgradeStrategy", "workerGroupSpecs"},
    "RayJob": {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionPolicy", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy",
               "metadata", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
               "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"},
    "RayService": {"rayClusterConfig", "serveConfigV2", "serveService"},
}
AUTH_FIELDS = {"enableK8sTokenAuth", "mode", "secretName"}
AUTOSCALER_FIELDS = {"env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
                     "securityContext", "upscalingMode", "version", "volumeMounts"}
HEAD_FIELDS = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_FIELDS = {"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
                 "rayStartParams", "replicas", "scaleStrategy", "suspend", "template"}

# A GPU worker's memory, as cluster/kuberay/raycluster.yaml sizes it: the actor holds the 7B fp16
# checkpoint in host memory while it loads, beside torch, CUDA and Python; each other CPU decodes
# images; the object store is what rayStartParams fixes; and 20% to spare.
WEIGHTS_7B = 7.06e9 * 2
RUNTIME = 4e9
PER_DECODING_CPU = 1e9
HEADROOM = 1.2

JOB_SCRIPT = re.compile(r"jobs/[\w-]+\.py")
SHELL_OPERATORS = {"&&", "||", ";", "|", "&"}


# --- reading the files --------------------------------------------------------------------------------


def read(path: Path) -> str:
    return path.read_text()


def manifest(kind: str, text: str | None = None) -> dict:
    text = read(KUBERAY / f"{kind.lower()}.yaml") if text is None else text
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert [d["kind"] for d in docs] == [kind], f"cluster/kuberay/{kind.lower()}.yaml holds one {kind}"
    return docs[0]


def cluster_spec(doc: dict) -> dict:
    return {"RayCluster": lambda: doc["spec"], "RayJob": lambda: doc["spec"]["rayClusterSpec"],
            "RayService": lambda: doc["spec"]["rayClusterConfig"]}[doc["kind"]]()


def gpu_group(spec: dict) -> dict:
    groups = [g for g in spec["workerGroupSpecs"] if GPU in worker_container(g)["resources"]["limits"]]
    assert len(groups) == 1, "one GPU worker group"
    return groups[0]


def worker_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def readme_section() -> str:
    text = read(ROOT / "README.md")
    start = text.index("\n## Scaling out\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```bash\n(.*?)```", markdown, flags=re.S))


def dockerfile_from(text: str) -> str:
    return re.search(r"^FROM\s+(\S+)", text, flags=re.M).group(1)


def ray_image(image: str) -> tuple[str, str]:
    """(Ray version, Python version) of an official rayproject/ray:<ray>-py<XY>-cu<NNN> image."""
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-cu\d+", image)
    assert m, f"{image} is not an official Ray GPU image tag"
    return m.group(1), f"{m.group(2)}.{m.group(3)}"


def quantity(value: str) -> float:
    """A Kubernetes quantity (48Gi, 500M, 12) as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(value))
    return float(m.group(1)) * units.get(m.group(2), 1)


# --- shell commands -------------------------------------------------------------------------------------


def shell_lines(text: str) -> list[list[str]]:
    """Each command line of a shell text as tokens (continuations joined, comments dropped)."""
    return [shlex.split(line, comments=True) for line in text.replace("\\\n", " ").splitlines() if line.strip()]


def job_commands(text: str) -> list[list[str]]:
    """Every `python jobs/<script>.py ...` in a shell text, as [script, args...] up to the end of its
    command, including those inside a quoted command (`ray exec ... 'cd x && python jobs/...'`)."""
    found = []
    for tokens in shell_lines(text):
        for i, token in enumerate(tokens):
            if token == "python" and i + 1 < len(tokens) and JOB_SCRIPT.fullmatch(tokens[i + 1]):
                argv = []
                for t in tokens[i + 1:]:
                    if t in SHELL_OPERATORS:
                        break
                    argv.append(t)
                found.append(argv)
            elif " " in token and JOB_SCRIPT.search(token):
                found += job_commands(token)
    return found


def flag_values(argv: list[str]) -> dict[str, str | None]:
    """--flag value / --flag=value / --switch from a command's arguments."""
    values = {}
    for i, token in enumerate(argv):
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            following = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            values[name] = value if eq else following
    return values


@functools.cache
def help_flags(script: str) -> frozenset[str]:
    """The flags a script's --help lists (run as a user would run it)."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out))


def command_problems(text: str) -> list[str]:
    """Scripts that do not exist and flags their --help does not list."""
    problems = []
    for script, *args in job_commands(text):
        if not (ROOT / script).is_file():
            problems.append(f"{script} does not exist")
            continue
        problems += [f"{script} has no {flag}" for flag in flag_values(args) if flag not in help_flags(script)]
    return problems


# --- resources ------------------------------------------------------------------------------------------


def caption_defaults() -> dict:
    from elastic_ray.pipeline.job import CaptionJob

    d = CaptionJob(input="", output="")
    return {"--num-actors": d.num_actors, "--gpus-per-actor": d.gpus_per_actor, "--cpus-per-actor": d.cpus_per_actor}


def caption_pool(argv: list[str]) -> tuple[int, float, float]:
    values = {**caption_defaults(), **{k: v for k, v in flag_values(argv).items() if v is not None}}
    return int(values["--num-actors"]), float(values["--gpus-per-actor"]), float(values["--cpus-per-actor"])


def pool_problems(argv: list[str], gpus_per_worker: float, cpus_per_worker: float, min_workers: int,
                  max_workers: int) -> list[str]:
    """A caption command against a GPU worker group: one GPU per actor, a pool the group can hold,
    and a CPU left for reading and writing (jobs/caption.py refuses the pool otherwise)."""
    actors, gpus, cpus = caption_pool(argv)
    problems = []
    if gpus != 1:
        problems.append(f"--gpus-per-actor is {gpus:g}; a caption actor takes one GPU")
    if actors * gpus > max_workers * gpus_per_worker:
        problems.append(f"{actors} actors x {gpus:g} GPUs exceed the group's {max_workers} x {gpus_per_worker:g}")
    if actors * cpus > max_workers * cpus_per_worker - 1:
        problems.append(f"{actors} actors x {cpus:g} CPUs leave no CPU for reading and writing")
    if min_workers and actors * gpus != min_workers * gpus_per_worker:
        problems.append(f"{actors} actors x {gpus:g} GPUs do not use the {min_workers} workers there from the start")
    return problems


def k8s_worker(group: dict) -> tuple[float, float]:
    """(GPUs, CPUs) of one pod of a worker group, after checking requests equal limits for both."""
    resources = worker_container(group)["resources"]
    for name in (GPU, "cpu"):
        assert quantity(resources["requests"][name]) == quantity(resources["limits"][name]), name
    return quantity(resources["limits"][GPU]), quantity(resources["limits"]["cpu"])


def memory_problems(group: dict) -> list[str]:
    cpus = k8s_worker(group)[1]
    store = float(group["rayStartParams"]["object-store-memory"])
    need = HEADROOM * (WEIGHTS_7B + RUNTIME + store + (cpus - 1) * PER_DECODING_CPU)
    have = quantity(worker_container(group)["resources"]["requests"]["memory"])
    return [] if have >= need else [f"memory {have / 2**30:.1f} GiB is below {need / 2**30:.1f} GiB for a 7B model"]


# --- the Serve application -------------------------------------------------------------------------------


def serve_problems(service: dict) -> list[str]:
    """serveConfigV2 is a Serve config whose import paths resolve to builders that accept its args,
    with replicas the GPU worker group can hold."""
    problems = []
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        return [f"serveConfigV2: {e}"]
    group = gpu_group(cluster_spec(service))
    gpus_per_pod, _ = k8s_worker(group)
    for app in config["applications"]:
        problems += [f"{app['name']}: unknown key {k}" for k in set(app) - set(ServeApplicationSchema.model_fields)]
        module, _, attr = app["import_path"].partition(":")
        try:
            builder = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            builder = None
        if builder is None:
            problems.append(f"{app['import_path']} does not resolve")
            continue
        (param,) = inspect.signature(builder).parameters.values()
        if not (inspect.isclass(param.annotation) and issubclass(param.annotation, BaseModel)):
            problems.append(f"{app['import_path']} takes no typed arguments")
            continue
        try:
            args = param.annotation.model_validate(app.get("args", {}))
        except ValidationError as e:
            problems.append(f"{app['import_path']} args: {e}")
            continue
        if not isinstance(builder(args), serve.Application):
            problems.append(f"{app['import_path']} does not build a Serve application")
        if args.num_gpus != 1:
            problems.append(f"num_gpus is {args.num_gpus:g}; a replica takes one GPU")
        most = args.max_replicas or args.num_replicas
        if most * args.num_gpus > group["maxReplicas"] * gpus_per_pod:
            problems.append(f"{most} replicas x {args.num_gpus:g} GPUs exceed the group's maxReplicas")
        if args.num_replicas * args.num_gpus > group["minReplicas"] * gpus_per_pod:
            problems.append(f"{args.num_replicas} replicas wait for GPU pods beyond minReplicas")
    return problems


# --- installing the package ------------------------------------------------------------------------------


def pip_installs(command: str) -> list[list[str]]:
    """The arguments of each `pip install` in a shell command."""
    found, current, previous = [], None, None
    for token in shlex.split(command) + [";"]:
        if token in SHELL_OPERATORS:
            if current is not None:
                found.append(current)
            current = None
        elif current is not None:
            current.append(token)
        elif previous == "pip" and token == "install":
            current = []
        previous = token
    return found


def install_problems(command: str, project_dir: str) -> list[str]:
    """A GPU install as the README's Set up has it: torch (the version constraints-cpu.txt pins for
    CPUs) without the CPU constraints file, then this project from `project_dir` with extras it has."""
    pinned_torch = re.search(r"^torch==(\S+)", read(ROOT / "constraints-cpu.txt"), flags=re.M).group(1)
    name = PYPROJECT["project"]["name"]
    extras = set(PYPROJECT["project"].get("optional-dependencies", {}))
    torch, project, problems = None, None, []
    for args in pip_installs(command):
        words = iter(args)
        for arg in words:
            if arg in ("-c", "--constraint"):
                problems.append(f"a GPU install takes no constraints file: {next(words)}")
            elif arg == "-e":
                project = (next(words), set())
            elif not arg.startswith("-"):
                req = Requirement(arg)
                if req.name == "torch":
                    torch = str(req.specifier)
                elif req.name == name and req.url:
                    project = (req.url.removeprefix("file://"), set(req.extras))
                else:
                    problems.append(f"installs {arg}, which is neither torch nor {name}")
    if torch != f"=={pinned_torch}":
        problems.append(f"torch {torch} is not the {pinned_torch} of constraints-cpu.txt")
    if project is None:
        problems.append(f"{name} is not installed")
    else:
        path, asked = project
        if path != project_dir:
            problems.append(f"installs {path}, not the copy of this repository at {project_dir}")
        problems += [f"{name} has no extra [{e}]" for e in sorted(asked - extras)]
    return problems


def dockerfile_problems(text: str) -> list[str]:
    """FROM an official Ray GPU image whose Ray and Python pyproject.toml accept; the repository
    copied to one folder; the install line of install_problems for that folder."""
    problems = []
    ray_version, python = ray_image(dockerfile_from(text))
    ray_req = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "ray")
    if Version(ray_version) not in ray_req.specifier:
        problems.append(f"Ray {ray_version} does not meet {ray_req}")
    if Version(python) not in Requirement(f"python{PYPROJECT['project']['requires-python']}").specifier:
        problems.append(f"Python {python} does not meet requires-python")
    copies = {src: dest for *srcs, dest in (line.split()[1:] for line in text.splitlines() if line.startswith("COPY"))
              for src in srcs if not src.startswith("--")}
    project_dir = copies.get("pyproject.toml", "").rstrip("/")
    for needed in ("README.md", "elastic_ray", "jobs"):
        if copies.get(needed, "").rstrip("/") not in (project_dir, f"{project_dir}/{needed}"):
            problems.append(f"{needed} is not copied beside pyproject.toml")
    runs = " ".join(line.removeprefix("RUN ") for line in text.replace("\\\n", " ").splitlines() if line.startswith("RUN"))
    return problems + install_problems(runs, project_dir)


def aws_problems(config: dict) -> list[str]:
    """aws.yaml is a valid cluster-launcher config that installs this checkout on the Dockerfile's
    base image, with a GPU worker type one caption actor fits."""
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        jsonschema.validate(config, schema)
    except jsonschema.ValidationError as e:
        return [f"aws.yaml: {e.message}"]
    problems = []
    if config["docker"]["image"] != dockerfile_from(read(CLUSTER / "Dockerfile")):
        problems.append("aws.yaml runs another image than cluster/Dockerfile's base")
    checkout = [remote for remote, local in config["file_mounts"].items() if local == "."]
    problems += install_problems(" && ".join(config["setup_commands"]), checkout[0] if checkout else "")
    return problems


def aws_gpu_type(config: dict) -> dict:
    (gpu,) = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    return gpu


# --- the tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    assert [d for d in yaml.safe_load_all(read(path)) if d]


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_manifest_fields_are_kuberays(kind):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert set(doc["spec"]) <= SPEC_FIELDS[kind]
    spec = cluster_spec(doc)
    assert set(spec) <= SPEC_FIELDS["RayCluster"]
    assert set(spec["headGroupSpec"]) <= HEAD_FIELDS
    assert all(set(g) <= WORKER_FIELDS for g in spec["workerGroupSpecs"])
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_FIELDS
    # Token auth on, with the token from the Secret the README creates.
    assert spec["authOptions"] == {"mode": "token", "secretName": "elastic-ray-auth"}
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_images_and_ray_version_agree():
    ray_version, _ = ray_image(dockerfile_from(read(CLUSTER / "Dockerfile")))
    image = f"{PYPROJECT['project']['name']}:{PYPROJECT['project']['version']}"
    for kind in SPEC_FIELDS:
        spec = cluster_spec(manifest(kind))
        assert spec["rayVersion"] == ray_version, kind
        pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert {c["image"] for p in pods for c in p["template"]["spec"]["containers"]} == {image}, kind


def test_raycluster_autoscales_gpu_workers():
    spec = cluster_spec(manifest("RayCluster"))
    group = gpu_group(spec)
    assert spec["enableInTreeAutoscaling"] is True
    assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert k8s_worker(group)[0] == 1
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert GPU not in head


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_gpu_workers_have_memory_for_a_7b_model(kind):
    assert memory_problems(gpu_group(cluster_spec(manifest(kind)))) == []


def test_rayjob_runs_the_caption_job_on_s3():
    job = manifest("RayJob")
    (argv,) = job_commands(job["spec"]["entrypoint"])
    values = flag_values(argv)
    assert argv[0] == "jobs/caption.py"
    assert values["--input"].startswith("s3://") and values["--output"].startswith("s3://")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    # S3 credentials come from a Secret reference, never inline.
    for pod in (cluster_spec(job)["headGroupSpec"], *cluster_spec(job)["workerGroupSpecs"]):
        container = pod["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "elastic-ray-s3"}}]
        assert not any(e.get("name", "").startswith("AWS_") for e in container.get("env", []))


def test_rayjob_command_and_resources():
    job = manifest("RayJob")
    group = gpu_group(cluster_spec(job))
    gpus, cpus = k8s_worker(group)
    assert command_problems(job["spec"]["entrypoint"]) == []
    (argv,) = job_commands(job["spec"]["entrypoint"])
    assert pool_problems(argv, gpus, cpus, group["minReplicas"], group["maxReplicas"]) == []
    # A fixed pool: all the GPUs the actors take are there when the job checks for them.
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]


def test_rayjob_runtime_env_is_the_images_copy(monkeypatch):
    env = yaml.safe_load(manifest("RayJob")["spec"]["runtimeEnvYAML"])
    dockerfile = read(CLUSTER / "Dockerfile")
    copied_to = re.search(r"^COPY .*pyproject\.toml.* (\S+?)/?$", dockerfile, flags=re.M).group(1)
    assert set(env) <= RuntimeEnv.known_fields
    assert env["working_dir"] == copied_to
    # The image's folder is a copy of this checkout: validate the env against the checkout.
    monkeypatch.chdir(ROOT)
    RuntimeEnv(**{**env, "working_dir": "."})


def test_runtime_env_yaml_is_a_runtime_env(monkeypatch):
    env = yaml.safe_load(read(CLUSTER / "runtime_env.yaml"))
    assert set(env) <= RuntimeEnv.known_fields
    monkeypatch.chdir(ROOT)  # `ray job submit` runs from the repository root
    RuntimeEnv(**env)


def test_rayservice_serves_the_app():
    assert serve_problems(manifest("RayService")) == []


def test_readme_commands():
    section = readme_section()
    commands = code_blocks(section)
    assert {argv[0] for argv in job_commands(commands)} >= {"jobs/caption.py", "jobs/serve.py", "jobs/load_test.py"}
    assert command_problems(commands) == []
    for path in set(re.findall(r"cluster/[\w./-]+", section)):
        assert (ROOT / path.rstrip(".")).exists(), path


def test_readme_caption_pools_fit_the_clusters():
    commands = code_blocks(readme_section())
    spec = cluster_spec(manifest("RayCluster"))
    group = gpu_group(spec)
    aws = aws_gpu_type(yaml.safe_load(read(CLUSTER / "aws.yaml")))
    scaled_to = [json.loads(tokens[tokens.index("-p") + 1])[0]["value"] for tokens in shell_lines(commands)
                 if tokens[:3] == ["kubectl", "patch", "raycluster"]]
    for argv in (c for c in job_commands(commands) if c[0] == "jobs/caption.py"):
        gpus, cpus = k8s_worker(group)
        assert pool_problems(argv, gpus, cpus, 0, group["maxReplicas"]) == []
        assert pool_problems(argv, aws["resources"]["GPU"], aws["resources"]["CPU"], 0, aws["max_workers"]) == []
        # The README scales the RayCluster's GPU group to the pool before submitting, then back to 0.
        assert max(scaled_to) == caption_pool(argv)[0] <= group["maxReplicas"] and min(scaled_to) == 0


def test_dockerfile_installs_the_package():
    assert dockerfile_problems(read(CLUSTER / "Dockerfile")) == []


def test_aws_yaml_installs_the_package_on_gpu_workers():
    config = yaml.safe_load(read(CLUSTER / "aws.yaml"))
    assert aws_problems(config) == []
    gpu = aws_gpu_type(config)
    assert gpu["resources"]["GPU"] == 1 and gpu["min_workers"] < gpu["max_workers"]
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    # Token auth on every node, with the token `ray get-auth-token --generate` wrote.
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


# --- the checks catch what they are for ----------------------------------------------------------------


def mutated(path: Path, old: str, new: str) -> str:
    text = read(path)
    assert old in text, f"{old!r} is not in {path.name}"
    return text.replace(old, new)


def rayjob_entrypoint(text: str) -> str:
    return manifest("RayJob", text)["spec"]["entrypoint"]


@pytest.mark.parametrize("old, new, expected", [
    ("--gpus-per-actor 1", "--gpus-per-worker 1", "jobs/caption.py has no --gpus-per-worker"),
    ("--max-num-seqs 16", "--max-seqs 16", "jobs/caption.py has no --max-seqs"),
    ("python jobs/caption.py", "python jobs/captions.py", "jobs/captions.py does not exist"),
])
def test_renamed_flag_or_script_in_the_rayjob_is_caught(old, new, expected):
    assert expected in command_problems(rayjob_entrypoint(mutated(KUBERAY / "rayjob.yaml", old, new)))


def test_renamed_flag_in_the_readme_is_caught():
    commands = code_blocks(readme_section()).replace("--concurrency 16", "--parallel 16")
    assert command_problems(commands) == ["jobs/load_test.py has no --parallel"]


@pytest.mark.parametrize("old, new", [("--num-actors 4", "--num-actors 5"), ("--gpus-per-actor 1", "--gpus-per-actor 0.5")])
def test_a_pool_off_the_worker_group_is_caught(old, new):
    text = mutated(KUBERAY / "rayjob.yaml", old, new)
    group = gpu_group(cluster_spec(manifest("RayJob", text)))
    (argv,) = job_commands(rayjob_entrypoint(text))
    assert pool_problems(argv, *k8s_worker(group), group["minReplicas"], group["maxReplicas"])


@pytest.mark.parametrize("old, new, expected", [
    ("max_num_seqs: 16", "max_seqs: 16", "max_seqs"),
    ("elastic_ray.serving:build_app", "elastic_ray.serving:build", "does not resolve"),
    ("max_replicas: 4", "max_replicas: 8", "exceed the group's maxReplicas"),
])
def test_a_wrong_serve_app_is_caught(old, new, expected):
    problems = serve_problems(manifest("RayService", mutated(KUBERAY / "rayservice.yaml", old, new)))
    assert any(expected in p for p in problems), problems


def test_too_little_worker_memory_is_caught():
    text = mutated(KUBERAY / "raycluster.yaml", "memory: 48Gi", "memory: 16Gi")
    assert memory_problems(gpu_group(cluster_spec(manifest("RayCluster", text))))


@pytest.mark.parametrize("old, new, expected", [
    ("torch==2.13.0", "torch==2.12.0", "torch ==2.12.0 is not"),
    ('"elastic-ray @', '"elastic-rays @', "neither torch nor elastic-ray"),
    ("py311-cu130", "py39-cu130", "Python 3.9 does not meet"),
    ("COPY --chown=1000:100 jobs /home/ray/elastic-ray/jobs", "COPY --chown=1000:100 jobs /opt/jobs",
     "jobs is not copied"),
])
def test_a_wrong_dockerfile_install_is_caught(old, new, expected):
    problems = dockerfile_problems(mutated(CLUSTER / "Dockerfile", old, new))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("old, new, expected", [
    ("-e ~/elastic-ray", "-e ~/elastic", "installs ~/elastic"),
    ("pip install --no-cache-dir -e", "pip install --no-cache-dir -c constraints-cpu.txt -e", "constraints"),
    ("min_workers: 0", "min_workerz: 0", "aws.yaml"),
])
def test_a_wrong_aws_yaml_is_caught(old, new, expected):
    problems = aws_problems(yaml.safe_load(mutated(CLUSTER / "aws.yaml", old, new)))
    assert any(expected in p for p in problems), problems
