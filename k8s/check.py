#!/usr/bin/python3
"""Checks gmi's Kubernetes manifests (k8s/) against the code they deploy.

Needs only Python 3 and PyYAML (Debian: python3-yaml) and no cluster; kubectl or kustomize,
where present, add the rendered checks below.

Every *.yaml / *.yml file under k8s/ is parsed (all documents; duplicate keys are errors).
Then:
  - kustomizations: every file they name (resources, components, patches, generators)
    exists and lies inside the kustomization's root (kustomize refuses other files), every
    directory they name holds a kustomization; every YAML file is used by some
    kustomization, unless it is named *.example.yaml;
  - containers of the gmi image: the arguments name a real `gmi` subcommand (read from
    tools/*.cpp), a long-running one in a Deployment or StatefulSet, and `worker --stage`
    a real stage (core/service/src/wire.cpp, stage_names()); --set keys are real config keys;
  - environment: every GMI_* variable is GMI_ + a key of config/gmi.yaml (dots as
    underscores, upper case), or GMI_REDIS_PASSWORD_FILE, GMI_API_KEY or GMI_CONFIG; env
    values, labels and annotations are strings; secrets are not literal env values;
  - probes name declared container ports (a port name or a containerPort number);
  - gmi config files (a configMapGenerator's or ConfigMap's gmi.yaml): known keys only.

For a full build (a kustomization of plain files, such as k8s/base, and the rendered
output of every kustomization), it also checks the pieces against each other,
with each container's effective configuration (defaults < mounted gmi.yaml < GMI_* env):
probes and Prometheus annotations point at the port the process really serves
(broker.ops_port, worker.ops_port, gateway.port), the broker binds a non-loopback address,
worker.broker / gateway.broker / redis.uri name a Service and port that lead to the broker
backend / frontend / Redis, every stage has a worker, score.shards agrees between the
broker and the score workers and every shard has a worker, files named by the config lie
on a mounted volume, Services, HPAs, PDBs and NetworkPolicies select existing workloads.

Rendering: each kustomization is also built with `kustomize build` or `kubectl kustomize`
(the first on PATH; neither needs a cluster) and the build checks run on the output: that
is where overlays' patches are checked as applied. By default this happens when a
renderer is found (a note says when none is); --render requires it, --no-render skips it.

Exit status: 0 clean, 1 problems found, 2 usage or environment error.
"""

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.stderr.write("check.py: needs PyYAML (Debian: apt-get install python3-yaml)\n")
    sys.exit(2)

EXTRA_ENV = {"GMI_REDIS_PASSWORD_FILE", "GMI_API_KEY", "GMI_CONFIG"}
SECRET_ENV = {"GMI_API_KEY", "GMI_REDIS_PASSWORD"}
LONG_RUNNING = {"broker", "worker", "gateway", "serve"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
SERVING_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"}
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
REDIS_USERS = {"broker", "gateway", "serve", "worker:interrogate", "worker:score", "worker:spec"}
LOOPBACK = re.compile(r"^(127\.|localhost$|::1$|\[::1\]$)")


class Problems:
    def __init__(self):
        self.errors = []
        self.notes = []

    def error(self, where, message):
        self.errors.append(f"{where}: {message}")

    def note(self, where, message):
        self.notes.append(f"{where}: {message}")


# ---- YAML -----------------------------------------------------------------------------

class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML keeps the last silently)."""


def _construct_mapping(loader, node, deep=False):
    loader.flatten_mapping(node)
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_docs(text, where, problems):
    """All non-empty documents of a YAML text, or [] (with an error) if it does not parse."""
    try:
        return [d for d in yaml.load_all(text, Loader=StrictLoader) if d is not None]
    except yaml.YAMLError as e:
        problems.error(where, f"YAML does not parse: {e}".replace("\n", " "))
        return []


def flatten(node, prefix=""):
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(flatten(v, key))
            else:
                out[key] = "" if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
    return out


def env_name(key):
    return "GMI_" + key.replace(".", "_").upper()


# ---- what the code says ---------------------------------------------------------------

class Code:
    """Config keys, subcommands and stage names, read from the repository."""

    def __init__(self, repo):
        path = os.path.join(repo, "config", "gmi.yaml")
        with open(path, encoding="utf-8") as f:
            self.defaults = flatten(yaml.safe_load(f))
        if not self.defaults:
            raise RuntimeError(f"{path} holds no keys")
        self.env = {env_name(k): k for k in self.defaults}

        subs = set()
        tools = os.path.join(repo, "tools")
        for name in sorted(os.listdir(tools)):
            if name.endswith(".cpp"):
                with open(os.path.join(tools, name), encoding="utf-8") as f:
                    subs.update(re.findall(r"\bapp\.add_subcommand\(\s*\"([^\"]+)\"", f.read()))
        if not subs:
            raise RuntimeError(f"no `app.add_subcommand(\"...\")` found in {tools}/*.cpp")
        self.subcommands = subs

        path = os.path.join(repo, "core", "service", "src", "wire.cpp")
        with open(path, encoding="utf-8") as f:
            m = re.search(r"stage_names\(\)\s*\{[^{]*names\s*\{([^}]*)\}", f.read())
        stages = re.findall(r"\"([a-z_]+)\"", m.group(1)) if m else []
        if not stages:
            raise RuntimeError(f"no stage list `names{{...}}` found in {path}")
        self.stages = stages

    def key_for_env(self, name):
        return self.env.get(name)


# ---- helpers on manifests -------------------------------------------------------------

def doc_id(doc):
    if not isinstance(doc, dict):
        return "(not a mapping)"
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def pod_spec(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec") or {})
    return ((spec.get("template") or {}).get("spec"))


def pod_template_meta(doc):
    if doc.get("kind") == "Pod":
        return doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    if doc.get("kind") == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec") or {})
    return ((spec.get("template") or {}).get("metadata") or {})


def containers_of(spec):
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def image_repo(image):
    image = image.split("@", 1)[0]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def is_gmi_container(c):
    image = c.get("image")
    if image:
        return image_repo(str(image)) == "gmi"
    # A patch names no image: treat it as gmi's when it passes gmi arguments.
    return bool(c.get("args")) and not c.get("command")


def gmi_argv(c):
    """The arguments after `gmi`, or None when the container runs something else."""
    command = c.get("command") or []
    args = [str(a) for a in (c.get("args") or [])]
    if command:
        if os.path.basename(str(command[0])) != "gmi":
            return None
        return [str(a) for a in command[1:]] + args
    return args


def option_values(argv, *names):
    out = []
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                out.append(argv[i + 1])
            elif a.startswith(n + "="):
                out.append(a[len(n) + 1:])
    return out


def role_of(argv):
    """broker / gateway / serve / worker:STAGE / other, from a container's gmi arguments."""
    if not argv:
        return None
    if argv[0] == "worker":
        stages = option_values(argv, "--stage")
        return "worker:" + (stages[0] if stages else "?")
    return argv[0]


def port_lookup(c):
    """name -> number and the set of numbers of a container's declared ports."""
    names, numbers = {}, set()
    for p in c.get("ports") or []:
        n = p.get("containerPort")
        if isinstance(n, int):
            numbers.add(n)
            if p.get("name"):
                names[str(p["name"])] = n
    return names, numbers


def resolve_port(ref, c):
    names, numbers = port_lookup(c)
    if isinstance(ref, int):
        return ref if ref in numbers else None
    if isinstance(ref, str):
        if ref.isdigit():
            return int(ref) if int(ref) in numbers else None
        return names.get(ref)
    return None


def probe_ports(c):
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        probe = c.get(kind)
        if not isinstance(probe, dict):
            continue
        for handler in ("httpGet", "tcpSocket", "grpc"):
            h = probe.get(handler)
            if isinstance(h, dict) and "port" in h:
                yield kind, handler, h["port"]


def selector_matches(selector, labels):
    """True when a LabelSelector (matchLabels / matchExpressions) selects `labels`."""
    if not isinstance(selector, dict):
        return False
    ml = selector.get("matchLabels", None)
    me = selector.get("matchExpressions", None)
    if ml is None and me is None and selector:
        ml = selector  # a Service's plain map
    for k, v in (ml or {}).items():
        if labels.get(k) != v:
            return False
    for e in me or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def mounted(path, c):
    return any(path == m.get("mountPath") or path.startswith(str(m.get("mountPath", "")).rstrip("/") + "/")
               for m in c.get("volumeMounts") or [])


def parse_endpoint(ep):
    """(host, port) of tcp://HOST:PORT, or None."""
    m = re.match(r"^tcp://(\[[^\]]+\]|[^:/]+):(\d+)$", ep or "")
    return (m.group(1), int(m.group(2))) if m else None


def parse_redis(uri):
    m = re.match(r"^redis://(?:[^@/]*@)?(\[[^\]]+\]|[^:/?]+)(?::(\d+))?", uri or "")
    return (m.group(1), int(m.group(2) or 6379)) if m else None


# ---- per-document checks --------------------------------------------------------------

class Checker:
    def __init__(self, code, problems):
        self.code = code
        self.p = problems

    def check_config_text(self, where, text):
        docs = load_docs(text, where, self.p)
        if len(docs) > 1:
            self.p.error(where, "a gmi config file holds one YAML document")
        if not docs:
            return {}
        if not isinstance(docs[0], dict):
            self.p.error(where, "a gmi config file is a mapping of sections")
            return {}
        flat = flatten(docs[0])
        for key in flat:
            if key not in self.code.defaults:
                self.p.error(where, f"unknown config key {key!r} (gmi refuses to start; keys are in config/gmi.yaml)")
        return flat

    def check_strings(self, where, mapping, what):
        for k, v in (mapping or {}).items():
            if not isinstance(v, str):
                self.p.error(where, f"{what} {k!r} is {v!r} ({type(v).__name__}): Kubernetes wants a string, quote it")

    def check_doc(self, where, doc, full):
        """Checks one document on its own. full: a complete object, not a patch."""
        if not isinstance(doc, dict):
            self.p.error(where, "a Kubernetes document is a mapping")
            return
        for field in ("apiVersion", "kind"):
            if not doc.get(field):
                self.p.error(where, f"no {field}")
        meta = doc.get("metadata") or {}
        if not meta.get("name"):
            self.p.error(where, "no metadata.name")
        where = f"{where}: {doc_id(doc)}"
        self.check_strings(where, meta.get("labels"), "label")
        self.check_strings(where, meta.get("annotations"), "annotation")

        if doc.get("kind") == "ConfigMap":
            data = doc.get("data") or {}
            self.check_strings(where, data, "data key")
            if isinstance(data.get("gmi.yaml"), str):
                self.check_config_text(f"{where}: data gmi.yaml", data["gmi.yaml"])
        if doc.get("kind") not in WORKLOAD_KINDS:
            return
        spec = pod_spec(doc)
        if spec is None:
            if full:
                self.p.error(where, "no pod template")
            return
        tmeta = pod_template_meta(doc)
        self.check_strings(where + ": pod template", tmeta.get("labels"), "label")
        self.check_strings(where + ": pod template", tmeta.get("annotations"), "annotation")
        volumes = {v.get("name") for v in spec.get("volumes") or []}
        if doc.get("kind") == "StatefulSet":
            volumes |= {(t.get("metadata") or {}).get("name")
                        for t in (doc.get("spec") or {}).get("volumeClaimTemplates") or []}
        for c in containers_of(spec):
            cwhere = f"{where}: container {c.get('name', '?')}"
            self.check_env(cwhere, c)
            if is_gmi_container(c):
                self.check_args(cwhere, c, doc.get("kind"), full or bool(c.get("image")))
            complete = full and bool(c.get("image"))
            if complete:
                for kind, handler, ref in probe_ports(c):
                    if resolve_port(ref, c) is None:
                        names, numbers = port_lookup(c)
                        self.p.error(cwhere, f"{kind}.{handler}.port {ref!r} is not a declared container port "
                                             f"(names {sorted(names) or '-'}, numbers {sorted(numbers) or '-'})")
                for m in c.get("volumeMounts") or []:
                    if m.get("name") not in volumes:
                        self.p.error(cwhere, f"volumeMount {m.get('name')!r} names no volume of the pod")
        if full:
            port = (tmeta.get("annotations") or {}).get("prometheus.io/port")
            if port is not None:
                all_ports = set()
                for c in containers_of(spec):
                    all_ports |= port_lookup(c)[1]
                if not (str(port).isdigit() and int(port) in all_ports):
                    self.p.error(where, f"annotation prometheus.io/port {port!r} is not a declared container port "
                                        f"{sorted(all_ports)}")

    def check_env(self, where, c):
        for e in c.get("env") or []:
            name = str(e.get("name", ""))
            if "value" in e and not isinstance(e["value"], str):
                self.p.error(where, f"env {name}: value {e['value']!r} is not a string (quote it)")
            if not name.startswith("GMI_"):
                continue
            if name == "GMI_REDIS_PASSWORD":
                self.p.error(where, "env GMI_REDIS_PASSWORD puts the Redis password in the environment; "
                                    "mount the Secret and set GMI_REDIS_PASSWORD_FILE")
                continue
            if name in SECRET_ENV and "value" in e:
                self.p.error(where, f"env {name} holds a secret as plain text; use valueFrom.secretKeyRef "
                                    "or a mounted file (gateway.api_key_file)")
            if name not in EXTRA_ENV and self.code.key_for_env(name) is None:
                close = [n for n in self.code.env if n.startswith(name[:10])][:3]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                self.p.error(where, f"env {name} matches no config key of config/gmi.yaml{hint}")

    def check_args(self, where, c, kind, complete):
        argv = gmi_argv(c)
        if argv is None:
            self.p.error(where, f"runs {c.get('command')!r}, not gmi, from the gmi image")
            return
        if not argv:
            if complete:
                self.p.error(where, "no gmi subcommand in args (the image's default is `gmi --help`)")
            return
        sub = argv[0]
        if sub not in self.code.subcommands:
            self.p.error(where, f"{sub!r} is not a gmi subcommand ({', '.join(sorted(self.code.subcommands))})")
            return
        if kind in SERVING_KINDS and sub not in LONG_RUNNING:
            self.p.error(where, f"`gmi {sub}` ends when done, so a {kind} would restart it forever "
                                f"(long-running: {', '.join(sorted(LONG_RUNNING))})")
        if sub == "worker":
            stages = option_values(argv, "--stage")
            if not stages:
                self.p.error(where, "`gmi worker` needs --stage")
            for s in stages:
                if s not in self.code.stages:
                    self.p.error(where, f"--stage {s!r} is not a stage ({' | '.join(self.code.stages)})")
        for s in option_values(argv, "--set"):
            key = s.split("=", 1)[0]
            if "=" not in s or key not in self.code.defaults:
                self.p.error(where, f"--set {s!r}: expected KEY=VALUE with a key of config/gmi.yaml")


# ---- kustomizations -------------------------------------------------------------------

def is_remote(ref):
    return "://" in ref or ref.startswith(("github.com/", "git@", "gitlab.com/"))


def inside(root, path):
    root, path = os.path.realpath(root), os.path.realpath(path)
    return path == root or path.startswith(root + os.sep)


def kustomization_file(directory):
    for n in KUSTOMIZATION_NAMES:
        if os.path.isfile(os.path.join(directory, n)):
            return os.path.join(directory, n)
    return None


class Kustomization:
    """One kustomization: the files it names, checked to exist and stay inside its root."""

    def __init__(self, path, doc, rel, problems):
        self.path = path
        self.root = os.path.dirname(path)
        self.doc = doc if isinstance(doc, dict) else {}
        self.where = rel(path)
        self.rel = rel
        self.p = problems
        self.resource_files, self.resource_dirs = [], []
        self.patch_files, self.generated = [], []  # generated: (kind, name, {key: file})
        self.used = set()
        self._walk()

    def _file(self, ref, field, must_be_file=False):
        path = os.path.normpath(os.path.join(self.root, ref))
        if not os.path.exists(path):
            self.p.error(self.where, f"{field}: {ref!r} does not exist")
            return None
        if os.path.isdir(path):
            if must_be_file:
                self.p.error(self.where, f"{field}: {ref!r} is a directory")
                return None
            if kustomization_file(path) is None:
                self.p.error(self.where, f"{field}: directory {ref!r} holds no kustomization.yaml")
                return None
            return path
        if not inside(self.root, path):
            self.p.error(self.where, f"{field}: {ref!r} lies outside the kustomization's root; kustomize "
                                     "refuses it (LoadRestrictionsRootOnly): copy it in, or make its folder "
                                     "a kustomization")
            return None
        self.used.add(os.path.realpath(path))
        return path

    def _walk(self):
        d = self.doc
        for field in ("resources", "components", "bases"):
            for ref in d.get(field) or []:
                if not isinstance(ref, str):
                    self.p.error(self.where, f"{field}: entry {ref!r} is not a path")
                    continue
                if is_remote(ref):
                    continue
                path = self._file(ref, field)
                if path:
                    (self.resource_dirs if os.path.isdir(path) else self.resource_files).append(path)
        for entry in d.get("patches") or []:
            if isinstance(entry, dict) and entry.get("path"):
                path = self._file(entry["path"], "patches", must_be_file=True)
                if path:
                    self.patch_files.append(path)
            elif not (isinstance(entry, dict) and entry.get("patch")):
                self.p.error(self.where, f"patches: entry {entry!r} has neither path nor patch")
        for entry in d.get("patchesStrategicMerge") or []:
            if isinstance(entry, str) and "\n" not in entry and ":" not in entry:
                path = self._file(entry, "patchesStrategicMerge", must_be_file=True)
                if path:
                    self.patch_files.append(path)
        for entry in d.get("patchesJson6902") or []:
            if isinstance(entry, dict) and entry.get("path"):
                path = self._file(entry["path"], "patchesJson6902", must_be_file=True)
                if path:
                    self.patch_files.append(path)
        for field in ("generators", "transformers", "validators", "crds", "configurations"):
            for ref in d.get(field) or []:
                if isinstance(ref, str) and "\n" not in ref and not is_remote(ref):
                    self._file(ref, field)
        for field, kind in (("configMapGenerator", "ConfigMap"), ("secretGenerator", "Secret")):
            for g in d.get(field) or []:
                if not isinstance(g, dict) or not g.get("name"):
                    self.p.error(self.where, f"{field}: entry without a name")
                    continue
                files = {}
                for ref in g.get("files") or []:
                    key, _, file_ref = str(ref).rpartition("=")
                    path = self._file(file_ref, f"{field} {g['name']}", must_be_file=True)
                    if path:
                        files[key or os.path.basename(file_ref)] = path
                envs = list(g.get("envs") or []) + ([g["env"]] if g.get("env") else [])
                for ref in envs:
                    self._file(ref, f"{field} {g['name']}", must_be_file=True)
                self.generated.append((kind, g["name"], files, g.get("literals") or []))


# ---- whole-build checks ---------------------------------------------------------------

class Build:
    """A complete set of objects (a kustomization's output): cross-object checks."""

    def __init__(self, name, docs, code, problems):
        self.name = name
        self.docs = [d for d in docs if isinstance(d, dict)]
        self.code = code
        self.p = problems
        self.by_kind = {}
        for d in self.docs:
            self.by_kind.setdefault(d.get("kind"), {})[(d.get("metadata") or {}).get("name")] = d
        self.workloads = [d for d in self.docs if d.get("kind") in WORKLOAD_KINDS and pod_spec(d) is not None]

    def named(self, kind, name):
        return self.by_kind.get(kind, {}).get(name)

    def err(self, where, message):
        self.p.error(f"[{self.name}] {where}", message)

    # effective configuration of one gmi container
    def effective(self, doc, c, argv):
        cfg = dict(self.code.defaults)
        spec = pod_spec(doc)
        where = f"{doc_id(doc)}: container {c.get('name')}"
        config_paths = option_values(argv, "--config", "-c")
        env = {e.get("name"): e for e in c.get("env") or []}
        if not config_paths and isinstance((env.get("GMI_CONFIG") or {}).get("value"), str):
            config_paths = [env["GMI_CONFIG"]["value"]]
        for path in config_paths:
            text = self.mounted_file(spec, c, path)
            if text is None:
                self.err(where, f"config file {path} is on no volume of the container that this build can "
                                "read (mount the gmi-config ConfigMap there); its other checks are skipped")
                return None
            try:
                cfg.update(flatten(yaml.safe_load(text) or {}))
            except yaml.YAMLError:
                return None  # reported where the config file itself is checked
        for name, e in env.items():
            key = self.code.key_for_env(name or "")
            if key and isinstance(e.get("value"), str):
                cfg[key] = e["value"]
        for s in option_values(argv, "--set"):
            k, _, v = s.partition("=")
            cfg[k] = v
        return cfg

    def mounted_file(self, spec, c, path):
        vols = {v.get("name"): v for v in spec.get("volumes") or []}
        for m in c.get("volumeMounts") or []:
            mp = str(m.get("mountPath", "")).rstrip("/")
            if m.get("subPath"):
                if path != mp:
                    continue
                key = m["subPath"]
            elif path.startswith(mp + "/"):
                key = path[len(mp) + 1:]
            else:
                continue
            cm = (vols.get(m.get("name")) or {}).get("configMap")
            if not cm:
                return None
            obj = self.named("ConfigMap", cm.get("name"))
            if obj is None:
                return None
            items = {i.get("path"): i.get("key") for i in cm.get("items") or []}
            return (obj.get("data") or {}).get(items.get(key, key))
        return None

    def service_target(self, host, port):
        """The (workload, container, container port) a host:port reaches, or an error text."""
        name = host.split(".", 1)[0]
        svc = self.named("Service", name)
        if svc is None:
            return None, f"no Service {name!r} in this build"
        sp = next((p for p in (svc.get("spec") or {}).get("ports") or [] if p.get("port") == port), None)
        if sp is None:
            return None, f"Service {name!r} has no port {port}"
        selector = (svc.get("spec") or {}).get("selector") or {}
        for w in self.workloads:
            if selector and selector_matches(selector, pod_template_meta(w).get("labels") or {}):
                for c in containers_of(pod_spec(w)):
                    n = resolve_port(sp.get("targetPort", port), c)
                    if n is not None:
                        return (w, c, n), None
        return None, f"Service {name!r} port {port} leads to no container port of a selected pod"

    def run(self):
        roles = []  # (doc, container, role, cfg, where)
        self.skipped = set()  # roles whose configuration could not be read
        for w in self.workloads:
            spec = pod_spec(w)
            for c in containers_of(spec):
                if not is_gmi_container(c):
                    continue
                argv = gmi_argv(c) or []
                role = role_of(argv)
                where = f"{doc_id(w)}: container {c.get('name')}"
                if role is None:
                    continue
                cfg = self.effective(w, c, argv)
                if cfg is None:
                    self.skipped.add(role)
                    continue
                roles.append((w, c, role, cfg, where))
                self.check_ports(w, c, role, cfg, where)
                self.check_files(c, role, cfg, where)
        self.check_topology(roles)
        self.check_selectors()
        self.check_references()
        self.check_namespaces()

    def check_ports(self, w, c, role, cfg, where):
        expected = {}
        if role == "broker":
            expected["broker.ops_port"] = cfg.get("broker.ops_port")
        elif role.startswith("worker:"):
            expected["worker.ops_port"] = cfg.get("worker.ops_port")
        elif role == "gateway":
            expected["gateway.port"] = cfg.get("gateway.port")
        elif role == "serve":
            expected["serve.ops_port"] = cfg.get("serve.ops_port")
        ops = {}
        for key, value in expected.items():
            if not str(value).isdigit() or int(value) <= 0:
                self.err(where, f"{key} is {value}: no fixed port for probes and Prometheus "
                                "(0 picks a random one, -1 disables); set one, e.g. 9100")
                continue
            ops[key] = int(value)
            if int(value) not in port_lookup(c)[1]:
                self.err(where, f"{key} is {value}, but the container declares no such port")
        serving = set(ops.values())
        if role == "serve" and str(cfg.get("gateway.port")).isdigit():
            serving.add(int(cfg["gateway.port"]))
        for kind, handler, ref in probe_ports(c):
            n = resolve_port(ref, c)
            if handler == "httpGet" and n is not None and serving and n not in serving:
                self.err(where, f"{kind} probes port {n}, but `gmi {role.split(':')[0]}` serves HTTP on "
                                f"{sorted(serving)} ({', '.join(sorted(ops))})")
        ann = (pod_template_meta(w).get("annotations") or {})
        if ann.get("prometheus.io/scrape") == "true" and serving:
            port = ann.get("prometheus.io/port")
            if port is None or not str(port).isdigit() or int(port) not in serving:
                self.err(where, f"prometheus.io/port {port!r} is not where /metrics is served {sorted(serving)}")
        if role in ("broker", "serve"):
            for key in ("broker.frontend", "broker.backend"):
                for ep in str(cfg.get(key, "")).split(","):
                    hp = parse_endpoint(ep.strip())
                    if hp is None:
                        continue
                    if LOOPBACK.match(hp[0]):
                        self.err(where, f"{key} {ep} binds loopback: no other pod can reach it "
                                        "(bind tcp://*:PORT)")
                    elif hp[1] not in port_lookup(c)[1]:
                        self.err(where, f"{key} {ep}: port {hp[1]} is not a declared container port")
        if role == "gateway" and LOOPBACK.match(str(cfg.get("gateway.host", ""))):
            self.err(where, f"gateway.host {cfg['gateway.host']} listens on loopback: the Service cannot reach it")

    def check_files(self, c, role, cfg, where):
        env = {e.get("name"): e for e in c.get("env") or []}
        files = []
        pw = (env.get("GMI_REDIS_PASSWORD_FILE") or {}).get("value")
        if isinstance(pw, str) and pw:
            files.append(("GMI_REDIS_PASSWORD_FILE", pw))
        if role in ("gateway", "serve") and cfg.get("gateway.api_key_file") and "GMI_API_KEY" not in env:
            files.append(("gateway.api_key_file", cfg["gateway.api_key_file"]))
        if str(cfg.get("curve.enabled", "false")).lower() in ("true", "yes", "on", "1"):
            keys = ["curve.server_keys"] if role == "broker" else ["curve.server_public", "curve.client_keys"]
            if role == "serve":
                keys = ["curve.server_keys"]
            for k in keys:
                if not cfg.get(k):
                    self.err(where, f"curve.enabled is true but {k} is empty")
                else:
                    files.append((k, cfg[k]))
        for what, path in files:
            if not mounted(path, c):
                self.err(where, f"{what} {path} is on no volumeMount of the container")
        redis_pod = any(image_repo(str(c2.get("image", ""))) == "redis"
                        for w in self.workloads for c2 in containers_of(pod_spec(w)))
        if role in REDIS_USERS and redis_pod and not pw and "GMI_REDIS_PASSWORD" not in env:
            self.err(where, "uses Redis but sets no GMI_REDIS_PASSWORD_FILE")

    def check_topology(self, roles):
        brokers = [r for r in roles if r[2] in ("broker", "serve")]
        workers = [r for r in roles if r[2].startswith("worker:")]
        if not roles:
            return
        for w, c, role, cfg, where in roles:
            links = []
            if role.startswith("worker:"):
                links.append(("worker.broker", cfg.get("worker.broker"), "broker.backend"))
            if role == "gateway":
                links.append(("gateway.broker", cfg.get("gateway.broker"), "broker.frontend"))
            for key, ep, bind_key in links:
                hp = parse_endpoint(str(ep))
                if hp is None:
                    self.err(where, f"{key} {ep!r} is not tcp://HOST:PORT")
                    continue
                if LOOPBACK.match(hp[0]):
                    self.err(where, f"{key} {ep} is loopback: the broker runs in another pod")
                    continue
                target, why = self.service_target(*hp)
                if target is None:
                    self.err(where, f"{key} {ep}: {why}")
                    continue
                tw, tc, tport = target
                if not self.ingress_allowed(w, tw, tport):
                    self.err(where, f"{key} {ep}: no NetworkPolicy lets this pod reach {doc_id(tw)} port {tport} "
                                    "(does its pod template carry the labels the policy's `from` asks for?)")
                trole = role_of(gmi_argv(tc) or []) if is_gmi_container(tc) else None
                if trole not in ("broker", "serve"):
                    self.err(where, f"{key} {ep} leads to {doc_id(tw)}, which is not the broker")
                    continue
                tcfg = next((r[3] for r in brokers if r[1] is tc), {})
                bound = [parse_endpoint(e.strip()) for e in str(tcfg.get(bind_key, "")).split(",")]
                if tport not in [b[1] for b in bound if b]:
                    self.err(where, f"{key} {ep} reaches the broker's port {tport}, which is not its "
                                    f"{bind_key} ({tcfg.get(bind_key)})")
            if role in REDIS_USERS:
                hp = parse_redis(cfg.get("redis.uri"))
                if hp is None:
                    self.err(where, f"redis.uri {cfg.get('redis.uri')!r} is not redis://HOST[:PORT]")
                elif LOOPBACK.match(hp[0]):
                    self.err(where, f"redis.uri {cfg['redis.uri']} is loopback: Redis runs in another pod")
                else:
                    target, why = self.service_target(*hp)
                    if target is None:
                        self.err(where, f"redis.uri {cfg['redis.uri']}: {why}")
                    elif not self.ingress_allowed(w, target[0], target[2]):
                        self.err(where, f"redis.uri {cfg['redis.uri']}: no NetworkPolicy lets this pod reach "
                                        f"{doc_id(target[0])} port {target[2]} (does its pod template carry "
                                        "the labels the policy's `from` asks for?)")

        if brokers and not any(r[2] == "serve" for r in roles):
            have = {r[2].split(":", 1)[1] for r in workers}
            for s in self.code.stages:
                if s not in have and f"worker:{s}" not in self.skipped:
                    self.err("workers", f"no worker runs stage {s!r}: jobs that need it would never finish")
        if len(brokers) > 1:
            self.err("broker", f"{len(brokers)} broker containers: the broker is a single instance")
        for w, c, role, cfg, where in brokers:
            if w.get("kind") == "Deployment":
                spec = w.get("spec") or {}
                if spec.get("replicas", 1) != 1:
                    self.err(where, f"replicas {spec.get('replicas')}: the broker is a single instance")
                if (spec.get("strategy") or {}).get("type") != "Recreate":
                    self.err(where, "strategy is not Recreate: a rolling update runs two brokers at once")
        # score shards
        if brokers:
            n = brokers[0][3].get("score.shards", "1")
            scores = [r for r in workers if r[2] == "worker:score"]
            covered = set()
            for w, c, role, cfg, where in scores:
                if cfg.get("score.shards") != n:
                    self.err(where, f"score.shards is {cfg.get('score.shards')} but the broker's is {n}: "
                                    "they must agree")
                    continue
                shard = cfg.get("score.shard", "0")
                if not (shard.isdigit() and str(n).isdigit() and int(shard) < int(n)):
                    self.err(where, f"score.shard {shard} is not in [0, {n})")
                    continue
                covered.add(int(shard))
            if scores and str(n).isdigit():
                for i in range(int(n)):
                    if i not in covered:
                        self.err("score", f"shard {i} of {n} has no score worker: every query waits for it")

    def check_selectors(self):
        pods = [(w, pod_template_meta(w).get("labels") or {}) for w in self.workloads]
        for svc in self.by_kind.get("Service", {}).values():
            where = doc_id(svc)
            selector = (svc.get("spec") or {}).get("selector")
            if not selector:
                continue
            matched = [w for w, labels in pods if selector_matches(selector, labels)]
            if not matched:
                self.err(where, f"selector {selector} matches no pod template")
                continue
            for p in (svc.get("spec") or {}).get("ports") or []:
                tp = p.get("targetPort", p.get("port"))
                if not any(resolve_port(tp, c) is not None for w in matched for c in containers_of(pod_spec(w))):
                    self.err(where, f"port {p.get('name', p.get('port'))}: targetPort {tp!r} is no container "
                                    "port of the selected pods")
        for kind in ("PodDisruptionBudget", "NetworkPolicy"):
            for obj in self.by_kind.get(kind, {}).values():
                field = "selector" if kind == "PodDisruptionBudget" else "podSelector"
                sel = (obj.get("spec") or {}).get(field)
                if sel and not any(selector_matches(sel, labels) for _, labels in pods):
                    self.err(doc_id(obj), f"{field} matches no pod template")
        for hpa in self.by_kind.get("HorizontalPodAutoscaler", {}).values():
            spec = hpa.get("spec") or {}
            ref = spec.get("scaleTargetRef") or {}
            target = self.named(ref.get("kind"), ref.get("name"))
            if target is None:
                self.err(doc_id(hpa), f"scaleTargetRef {ref.get('kind')}/{ref.get('name')} is not in this build")
                continue
            lo, hi = spec.get("minReplicas", 1), spec.get("maxReplicas")
            if isinstance(hi, int) and isinstance(lo, int) and lo > hi:
                self.err(doc_id(hpa), f"minReplicas {lo} > maxReplicas {hi}")
            uses_cpu = any((m.get("resource") or {}).get("name") == "cpu" for m in spec.get("metrics") or [])
            if uses_cpu:
                for c in (pod_spec(target) or {}).get("containers") or []:
                    if not ((c.get("resources") or {}).get("requests") or {}).get("cpu"):
                        self.err(doc_id(hpa), f"scales on CPU utilisation, but container {c.get('name')} of "
                                              f"{doc_id(target)} requests no cpu")

    def check_namespaces(self):
        cluster_scoped = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass",
                          "CustomResourceDefinition", "PersistentVolume", "IngressClass"}
        spaces = {}
        for d in self.docs:
            if d.get("kind") not in cluster_scoped:
                spaces.setdefault((d.get("metadata") or {}).get("namespace"), []).append(doc_id(d))
        if len(spaces) > 1:
            parts = [f"{ns or '(none: the default namespace)'}: {', '.join(ids[:4])}"
                     + (f" and {len(ids) - 4} more" if len(ids) > 4 else "") for ns, ids in spaces.items()]
            self.err("namespaces", "objects are split over namespaces, so names do not resolve across them "
                                   "(set `namespace:` in every kustomization): " + "; ".join(parts))

    def ingress_allowed(self, source, target, port):
        """Whether the NetworkPolicies of this build let pods of `source` reach `target`:port."""
        src_labels = pod_template_meta(source).get("labels") or {}
        dst_labels = pod_template_meta(target).get("labels") or {}
        policies = [n for n in self.by_kind.get("NetworkPolicy", {}).values()
                    if selector_matches((n.get("spec") or {}).get("podSelector") or {"matchLabels": {}}, dst_labels)
                    and "Ingress" in ((n.get("spec") or {}).get("policyTypes") or ["Ingress"])]
        if not policies:
            return True
        for n in policies:
            for rule in (n.get("spec") or {}).get("ingress") or []:
                ports = rule.get("ports")
                if ports and not any(p.get("port") in (port, None) or
                                     (isinstance(p.get("port"), str) and resolve_port(p["port"], c) == port)
                                     for p in ports for c in containers_of(pod_spec(target))):
                    continue
                peers = rule.get("from")
                if not peers:
                    return True
                for peer in peers:
                    if "ipBlock" in peer or "namespaceSelector" in peer:
                        return True  # beyond what a static check can judge
                    if selector_matches(peer.get("podSelector") or {"matchLabels": {}}, src_labels):
                        return True
        return False

    def check_references(self):
        secrets = set(self.by_kind.get("Secret", {}))
        configmaps = set(self.by_kind.get("ConfigMap", {}))
        external = {}
        for w in self.workloads:
            spec = pod_spec(w)
            refs = []
            for v in spec.get("volumes") or []:
                if v.get("secret"):
                    refs.append(("Secret", v["secret"].get("secretName")))
                if v.get("configMap"):
                    refs.append(("ConfigMap", v["configMap"].get("name")))
                for src in (v.get("projected") or {}).get("sources") or []:
                    if src.get("secret"):
                        refs.append(("Secret", src["secret"].get("name")))
                    if src.get("configMap"):
                        refs.append(("ConfigMap", src["configMap"].get("name")))
            for c in containers_of(spec):
                for e in c.get("env") or []:
                    vf = e.get("valueFrom") or {}
                    if vf.get("secretKeyRef"):
                        refs.append(("Secret", vf["secretKeyRef"].get("name")))
                    if vf.get("configMapKeyRef"):
                        refs.append(("ConfigMap", vf["configMapKeyRef"].get("name")))
            for kind, name in refs:
                have = secrets if kind == "Secret" else configmaps
                if name in have:
                    continue
                hashed = [h for h in have if h.startswith(f"{name}-")]
                if hashed:
                    self.err(doc_id(w), f"refers to {kind} {name!r}, but this build has {hashed[0]!r} "
                                        "(a generator's hash suffix the reference did not get)")
                elif kind == "ConfigMap":
                    self.err(doc_id(w), f"refers to ConfigMap {name!r}, which is not in this build")
                else:
                    external.setdefault(name, []).append(doc_id(w))
        for name, users in sorted(external.items()):
            self.p.note(f"[{self.name}]", f"Secret {name!r} is not in this build: create it in the cluster "
                                          f"before these start: {', '.join(sorted(set(users)))}")


def apply_kustomization_basics(kdoc, doc):
    """A copy of doc with the kustomization's namespace and common labels, as kustomize sets
    them (for the static build checks; selectors and templates as the options say)."""
    doc = copy.deepcopy(doc)
    if not isinstance(doc, dict):
        return doc
    meta = doc.setdefault("metadata", {})
    if kdoc.get("namespace") and doc.get("kind") != "Namespace":
        meta["namespace"] = kdoc["namespace"]
    sets = []
    if kdoc.get("commonLabels"):
        sets.append((kdoc["commonLabels"], True, True))
    for entry in kdoc.get("labels") or []:
        sets.append((entry.get("pairs") or {}, bool(entry.get("includeSelectors")),
                     bool(entry.get("includeTemplates")) or bool(entry.get("includeSelectors"))))
    for pairs, selectors, templates in sets:
        meta.setdefault("labels", {}).update(pairs)
        spec = doc.get("spec") if isinstance(doc.get("spec"), dict) else {}
        if templates and doc.get("kind") in WORKLOAD_KINDS and isinstance(spec.get("template"), dict):
            spec["template"].setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if selectors:
            if doc.get("kind") in WORKLOAD_KINDS or doc.get("kind") == "PodDisruptionBudget":
                spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
            elif doc.get("kind") == "Service" and spec.get("selector") is not None:
                spec["selector"].update(pairs)
            elif doc.get("kind") == "NetworkPolicy":
                spec.setdefault("podSelector", {}).setdefault("matchLabels", {}).update(pairs)
    return doc


# ---- driver ---------------------------------------------------------------------------

def find_renderer():
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(
        prog="k8s/check.py",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", default=os.path.dirname(here),
                    help="repository root (default: the folder above this script's)")
    ap.add_argument("--dir", default=None, help="manifests folder (default: REPO/k8s)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--render", dest="render", action="store_const", const="yes", default="auto",
                      help="require rendering every kustomization (kustomize build / kubectl kustomize) "
                           "and check the output; exit 2 if neither tool is on PATH")
    mode.add_argument("--no-render", dest="render", action="store_const", const="no",
                      help="static checks only")
    ap.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    args = ap.parse_args(argv)

    repo = os.path.abspath(args.repo)
    k8s = os.path.abspath(args.dir or os.path.join(repo, "k8s"))
    rel = lambda p: os.path.relpath(p, repo)
    try:
        code = Code(repo)
    except (OSError, RuntimeError, yaml.YAMLError) as e:
        sys.stderr.write(f"check.py: cannot read what the code defines: {e}\n")
        return 2
    if not os.path.isdir(k8s):
        sys.stderr.write(f"check.py: no folder {k8s}\n")
        return 2

    problems = Problems()
    checker = Checker(code, problems)
    yaml_files, kust_files = [], []
    for dirpath, dirnames, filenames in os.walk(k8s):
        dirnames.sort()
        for n in sorted(filenames):
            path = os.path.join(dirpath, n)
            if n in KUSTOMIZATION_NAMES:
                kust_files.append(path)
            elif n.endswith((".yaml", ".yml")):
                yaml_files.append(path)

    texts = {}
    for path in yaml_files + kust_files:
        with open(path, encoding="utf-8") as f:
            texts[path] = f.read()

    kusts = {}
    for path in kust_files:
        docs = load_docs(texts[path], rel(path), problems)
        if len(docs) != 1 or not isinstance(docs[0], dict):
            problems.error(rel(path), "a kustomization is one YAML mapping")
            continue
        kusts[path] = Kustomization(path, docs[0], rel, problems)

    used, patches, config_files = set(), set(), set()
    for k in kusts.values():
        used |= k.used
        patches |= {os.path.realpath(p) for p in k.patch_files}
        for kind, name, files, _ in k.generated:
            for key, path in files.items():
                if key == "gmi.yaml":
                    config_files.add(os.path.realpath(path))

    ndocs = 0
    parsed = {}
    for path in yaml_files:
        real = os.path.realpath(path)
        if real in config_files or os.path.basename(path) == "gmi.yaml":
            checker.check_config_text(rel(path), texts[path])
            continue
        docs = load_docs(texts[path], rel(path), problems)
        parsed[path] = docs
        ndocs += len(docs)
        example = os.path.basename(path).endswith((".example.yaml", ".example.yml"))
        if real not in used and not example:
            problems.error(rel(path), "is in no kustomization (add it to resources or patches, or name it "
                                      "*.example.yaml if it is a template)")
        for i, doc in enumerate(docs):
            where = rel(path) + (f" #{i + 1}" if len(docs) > 1 else "")
            checker.check_doc(where, doc, full=real not in patches)

    # Build checks, statically, for kustomizations made of plain files only (no patches).
    builds = 0
    for path, k in sorted(kusts.items()):
        if k.resource_dirs or k.patch_files or k.doc.get("patches"):
            continue
        docs = []
        for f in k.resource_files:
            docs += parsed.get(f, [])
        for kind, name, files, literals in k.generated:
            data = {}
            for key, fp in files.items():
                with open(fp, encoding="utf-8") as fh:
                    data[key] = fh.read()
            for lit in literals:
                key, _, value = str(lit).partition("=")
                data[key] = value
            docs.append({"apiVersion": "v1", "kind": kind, "metadata": {"name": name}, "data": data})
        Build(rel(k.root), [apply_kustomization_basics(k.doc, d) for d in docs], code, problems).run()
        builds += 1

    rendered = 0
    renderer = find_renderer() if args.render != "no" else None
    if args.render == "yes" and renderer is None:
        sys.stderr.write("check.py: --render needs kustomize or kubectl on PATH\n")
        return 2
    if args.render == "auto" and renderer is None:
        problems.note("check.py", "neither kustomize nor kubectl is on PATH: overlays were checked file by "
                                  "file, not as rendered")
    if renderer is not None:
        for path, k in sorted(kusts.items()):
            proc = subprocess.run(renderer + [k.root], capture_output=True, text=True)
            name = rel(k.root)
            if proc.returncode != 0:
                problems.error(name, f"`{' '.join(renderer)}` failed: {proc.stderr.strip()[-2000:]}")
                continue
            for line in proc.stderr.splitlines():
                if line.strip():
                    problems.note(name, f"{renderer[0]}: {line.strip()}")
            docs = load_docs(proc.stdout, f"{name} (rendered)", problems)
            for i, doc in enumerate(docs):
                checker.check_doc(f"[{name} rendered] #{i + 1}", doc, full=True)
            Build(f"{name} rendered", docs, code, problems).run()
            rendered += 1

    for line in problems.errors:
        print(f"error: {line}")
    if not args.quiet:
        for line in problems.notes:
            print(f"note: {line}")
    summary = (f"{len(yaml_files) + len(kust_files)} YAML files, {ndocs} documents, "
               f"{len(kusts)} kustomizations, {builds} checked as a build"
               + (f", {rendered} rendered with `{' '.join(renderer)}` and checked" if renderer else
                  ", none rendered"))
    if problems.errors:
        print(f"check.py: {len(problems.errors)} problem(s) in {summary}")
        return 1
    if not args.quiet:
        print(f"check.py: OK: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
