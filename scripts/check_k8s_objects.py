#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests (the output of `kubectl kustomize` for an overlay).

Run by scripts/check-deploy.sh inside .venv-deploy (needs kubernetes-validate, jsonschema and
PyYAML). For every file given:

1. Every object against the Kubernetes OpenAPI schemas of each requested version, strictly
   (unknown fields fail), with kubernetes-validate. Kinds outside the core schemas (CRDs such as
   the Prometheus Operator's ServiceMonitor) are validated against the JSON schemas bundled in
   the schema folder (file name: `<kind>-<group>-<version>.json`, kubernetes-validate's naming);
   a kind with no schema at all is an error, never skipped.
2. The objects against each other: workload selectors match their pod templates; Services,
   PodDisruptionBudgets and ServiceMonitors select something and name ports that exist; the
   StatefulSet's serviceName is a headless Service; the HPA's target exists; ConfigMap volumes
   name a rendered ConfigMap; every namespaced object has a namespace.
3. Drain timing: for rrt node and coordinator containers, terminationGracePeriodSeconds covers
   the preStop sleep plus node.drain_seconds (coordinator.shutdown_seconds + 2 s) plus 5 s, with
   the value taken the way rrt takes it (flag > RRT_* env > the mounted rrt.toml > default).
4. Pod hardening: non-root, no privilege escalation, resource requests on every container.

Prints one summary line per file and every problem found; exits 1 on any problem.
"""

import argparse
import collections
import json
import os
import re
import sys
import tomllib

import jsonschema
import yaml
from kubernetes_validate import utils as kv

# rrt's defaults (rrt/src/config.rs) for the keys the drain check reads.
DEFAULTS = {"node.drain_seconds": 30, "coordinator.shutdown_seconds": 30}
# After SIGTERM the coordinator fails readiness, waits min(shutdown / 4, 2 s), then gives open
# streams shutdown_seconds (rrt/src/cmd/coordinator.rs).
COORDINATOR_LEAD_S = 2
MARGIN_S = 5
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def schema_name(doc):
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    return "%s-%s" % (doc["kind"].lower(), api)


def load_bundled(folder):
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".json"):
            with open(os.path.join(folder, f)) as fh:
                schema = json.load(fh)
            jsonschema.Draft202012Validator.check_schema(schema)
            out[f[:-5]] = jsonschema.Draft202012Validator(schema)
    return out


def selects(selector, labels):
    """A LabelSelector (matchLabels / matchExpressions) or a plain map against labels."""
    if selector is None:
        return False
    ml = selector.get("matchLabels", selector if "matchExpressions" not in selector else {})
    if not isinstance(ml, dict) or not all(labels.get(k) == v for k, v in ml.items()):
        return False
    for e in selector.get("matchExpressions", []):
        k, op, vals = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(k) not in vals:
            return False
        if op == "NotIn" and labels.get(k) in vals:
            return False
        if op == "Exists" and k not in labels:
            return False
        if op == "DoesNotExist" and k in labels:
            return False
    return True


def flag_value(args, flag):
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def effective(key, container, pod, configmaps):
    """The value rrt would use for `key` in this container: flag > env > rrt.toml > default."""
    section, field = key.split(".")
    args = container.get("args", [])
    v = flag_value(args, "--" + field.replace("_", "-"))
    if v is not None:
        return int(v), "flag"
    env_name = "RRT_%s__%s" % (section.upper(), field.upper())
    for e in container.get("env", []):
        if e.get("name") == env_name and "value" in e:
            return int(e["value"]), env_name
    cfg = flag_value(args, "--config")
    if cfg:
        for m in container.get("volumeMounts", []):
            mount = m["mountPath"].rstrip("/") + "/"
            if not cfg.startswith(mount):
                continue
            for vol in pod.get("volumes", []):
                if vol["name"] == m["name"] and "configMap" in vol:
                    cm = configmaps.get(vol["configMap"]["name"])
                    text = cm and cm.get("data", {}).get(cfg[len(mount):])
                    if text:
                        t = tomllib.loads(text)
                        if field in t.get(section, {}):
                            return int(t[section][field]), "rrt.toml"
    return DEFAULTS[key], "default"


def prestop_sleep(container):
    h = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in h:
        return int(h["sleep"]["seconds"])
    cmd = h.get("exec", {}).get("command", [])
    if len(cmd) == 2 and cmd[0] in ("sleep", "/bin/sleep"):
        return int(cmd[1])
    return 0


def check_file(path, versions, bundled):
    problems = []
    with open(path) as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    if not docs:
        return ["%s: no objects rendered" % path], ""
    kinds = collections.Counter()
    crd_kinds = set()

    # 1. Schemas.
    for d in docs:
        who = "%s/%s" % (d.get("kind"), d.get("metadata", {}).get("name"))
        kinds[d.get("kind")] += 1
        name = schema_name(d)
        if name in bundled:
            crd_kinds.add(d["kind"])
            for err in sorted(bundled[name].iter_errors(d), key=lambda e: list(e.path)):
                loc = ".".join(str(p) for p in err.path)
                problems.append("%s: %s: %s: %s (bundled schema %s.json)" % (path, who, loc, err.message, name))
            continue
        for v in versions:
            try:
                kv.validate(d, v, strict=True)
            except kv.ValidationError as e:
                loc = ".".join(str(p) for p in e.path)
                problems.append("%s: %s: %s: %s (Kubernetes %s, strict)" % (path, who, loc, e.message, v))
            except kv.SchemaNotFoundError:
                problems.append("%s: %s: no schema for %s %s in Kubernetes %s nor in the bundled schemas "
                                "(add deploy/k8s/schemas/%s.json)" % (path, who, d["apiVersion"], d["kind"], v, name))
                break

    by_kind = collections.defaultdict(dict)
    for d in docs:
        by_kind[d["kind"]][d["metadata"]["name"]] = d
        if d["kind"] not in CLUSTER_SCOPED and not d["metadata"].get("namespace"):
            problems.append("%s: %s/%s has no namespace (an overlay sets `namespace:`)" % (path, d["kind"], d["metadata"]["name"]))

    # 2. Cross-references.
    pods = []  # (workload, pod labels, pod spec)
    for kind in WORKLOADS:
        for name, w in by_kind[kind].items():
            tmpl = w["spec"]["template"]
            labels = tmpl.get("metadata", {}).get("labels", {})
            if not selects(w["spec"]["selector"], labels):
                problems.append("%s: %s/%s: selector does not match its pod template's labels" % (path, kind, name))
            pods.append(("%s/%s" % (kind, name), labels, tmpl["spec"]))
    for name, s in by_kind["Service"].items():
        sel = s["spec"].get("selector")
        chosen = [p for p in pods if sel and selects(sel, p[1])]
        if not chosen:
            problems.append("%s: Service/%s selects no pod template" % (path, name))
            continue
        for port in s["spec"]["ports"]:
            tp = port.get("targetPort", port["port"])
            found = any(
                (cp.get("name") == tp if isinstance(tp, str) else cp["containerPort"] == tp)
                for _, _, spec in chosen for c in spec["containers"] for cp in c.get("ports", []))
            if not found:
                problems.append("%s: Service/%s port %s: targetPort %r is no container port of %s"
                                % (path, name, port.get("name"), tp, ", ".join(p[0] for p in chosen)))
    for name, pdb in by_kind["PodDisruptionBudget"].items():
        if not any(selects(pdb["spec"]["selector"], p[1]) for p in pods):
            problems.append("%s: PodDisruptionBudget/%s selects no pod template" % (path, name))
    for name, st in by_kind["StatefulSet"].items():
        svc = by_kind["Service"].get(st["spec"].get("serviceName"))
        if svc is None or svc["spec"].get("clusterIP") != "None":
            problems.append("%s: StatefulSet/%s: serviceName %r is not a headless Service here"
                            % (path, name, st["spec"].get("serviceName")))
    for name, h in by_kind["HorizontalPodAutoscaler"].items():
        ref = h["spec"]["scaleTargetRef"]
        if ref["name"] not in by_kind[ref["kind"]]:
            problems.append("%s: HorizontalPodAutoscaler/%s: no %s/%s to scale" % (path, name, ref["kind"], ref["name"]))
    for name, sm in by_kind["ServiceMonitor"].items():
        svcs = [s for s in by_kind["Service"].values()
                if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not svcs:
            problems.append("%s: ServiceMonitor/%s selects no Service" % (path, name))
        for ep in sm["spec"]["endpoints"]:
            if "port" in ep and not any(p.get("name") == ep["port"] for s in svcs for p in s["spec"]["ports"]):
                problems.append("%s: ServiceMonitor/%s: no selected Service has a port named %r" % (path, name, ep["port"]))
    external_secrets = set()
    for wname, _, spec in pods:
        for vol in spec.get("volumes", []):
            if "configMap" in vol and vol["configMap"]["name"] not in by_kind["ConfigMap"]:
                problems.append("%s: %s: volume %s names ConfigMap %s, which is not rendered"
                                % (path, wname, vol["name"], vol["configMap"]["name"]))
            if "secret" in vol and vol["secret"]["secretName"] not in by_kind["Secret"]:
                external_secrets.add(vol["secret"]["secretName"])
    for sm in by_kind["ServiceMonitor"].values():
        for ep in sm["spec"]["endpoints"]:
            cred = ep.get("authorization", {}).get("credentials")
            if cred and cred["name"] not in by_kind["Secret"]:
                external_secrets.add(cred["name"])

    # 3. Drain timing and 4. hardening.
    for wname, _, spec in pods:
        grace = spec.get("terminationGracePeriodSeconds", 30)
        pod_nonroot = spec.get("securityContext", {}).get("runAsNonRoot")
        for c in spec.get("initContainers", []) + spec["containers"]:
            who = "%s container %s" % (wname, c["name"])
            sc = c.get("securityContext", {})
            if not (sc.get("runAsNonRoot", pod_nonroot) is True):
                problems.append("%s: %s: runAsNonRoot is not true" % (path, who))
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append("%s: %s: allowPrivilegeEscalation is not false" % (path, who))
            if not c.get("resources", {}).get("requests"):
                problems.append("%s: %s: no resource requests" % (path, who))
        for c in spec["containers"]:
            role = (c.get("args") or [None])[0]
            if role == "node":
                key, lead = "node.drain_seconds", 0
            elif role == "coordinator":
                key, lead = "coordinator.shutdown_seconds", COORDINATOR_LEAD_S
            else:
                continue
            value, source = effective(key, c, spec, by_kind["ConfigMap"])
            pre = prestop_sleep(c)
            need = pre + value + lead + MARGIN_S
            if grace < need:
                problems.append("%s: %s: terminationGracePeriodSeconds %d < preStop %d + %s %d (%s)%s + margin %d"
                                % (path, wname, grace, pre, key, value, source,
                                   " + %d" % lead if lead else "", MARGIN_S))

    parts = ", ".join("%s x%d" % (k, n) if n > 1 else k for k, n in sorted(kinds.items()))
    summary = "%s: %d objects (%s); schemas: Kubernetes %s strict%s; cross-references and drain timing checked" % (
        path, len(docs), parts, " and ".join(versions),
        "; %s against bundled CRD schemas" % ", ".join(sorted(crd_kinds)) if crd_kinds else "")
    if external_secrets:
        summary += "; Secrets to create beforehand: %s" % ", ".join(sorted(external_secrets))
    return problems, summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--versions", required=True, help="comma-separated Kubernetes versions, e.g. 1.30,1.37")
    ap.add_argument("--schemas", required=True, help="folder of bundled JSON schemas for CRD kinds")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()
    versions = [v.strip() for v in a.versions.split(",") if v.strip()]
    supported = kv.all_versions()
    for v in versions:
        if not any(s.startswith(v + ".") or s == v for s in supported):
            sys.exit("kubernetes-validate %s has no schemas for Kubernetes %s (it has %s)"
                     % (kv.__version__, v, ", ".join(supported)))
    bundled = load_bundled(a.schemas)
    failed = False
    for f in a.files:
        problems, summary = check_file(f, versions, bundled)
        for p in problems:
            print("ERROR " + p)
        if problems:
            failed = True
        else:
            print("OK " + summary)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
