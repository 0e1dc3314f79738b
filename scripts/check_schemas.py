#!/usr/bin/python3
"""Checks gmi's JSON Schemas (schemas/*.schema.json) and their examples.

1. Every schema is itself a valid draft 2020-12 schema (check_schema).
2. Every message example in schemas/examples/valid/ passes its channel's schema.
3. Every message example in schemas/examples/invalid/ fails its channel's schema, except
   those marked "schema_can_check": false (a rule JSON Schema cannot express, such as a
   frame count): those must PASS the schema, so that the C++ validator alone rejects them.
4. Every message type of every channel (the "type" consts of each schema's oneOf) has at
   least one valid example.
5. Every job object in schemas/examples/jobs/ passes job.schema.json, and a few broken
   copies of them fail it.

The C++ side (tests/unit/schemas_test.cpp) runs core/service/src/wire.cpp over the same examples.
Needs only the standard library and jsonschema >= 4 (Debian: python3-jsonschema).
Exit status: 0 all agree, 1 a mismatch or a malformed example file (all listed), 2 bad
usage, 77 jsonschema is missing or too old.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

CHANNELS = ("client-to-broker", "broker-to-client", "worker-to-broker", "broker-to-worker")
SKIP_EXIT = 77


def load_jsonschema():
    try:
        import jsonschema  # noqa: F401
        from jsonschema import Draft202012Validator
    except ImportError as e:
        print(f"check_schemas: jsonschema with draft 2020-12 support is not available ({e}); "
              "install python3-jsonschema (Debian) or `pip install jsonschema`", file=sys.stderr)
        sys.exit(SKIP_EXIT)
    return Draft202012Validator


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Checker:
    def __init__(self, schemas_dir, verbose):
        self.dir = schemas_dir
        self.verbose = verbose
        self.failures = []
        self.counts = {}
        self.Validator = load_jsonschema()
        self.schemas = {}
        self.validators = {}

    def fail(self, what):
        self.failures.append(what)

    def count(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1

    def note(self, text):
        if self.verbose:
            print(text)

    # ------------------------------------------------------------------ schemas

    def load_schemas(self):
        files = sorted(self.dir.glob("*.schema.json"))
        if not files:
            self.fail(f"no *.schema.json files in {self.dir}")
        for path in files:
            try:
                schema = read_json(path)
                self.Validator.check_schema(schema)
            except Exception as e:  # json errors and SchemaError alike
                self.fail(f"{path.name}: not a valid draft 2020-12 schema: {e}")
                continue
            if schema.get("$schema") != "https://json-schema.org/draft/2020-12/schema":
                self.fail(f"{path.name}: \"$schema\" is not draft 2020-12")
            self.schemas[path.name] = schema
            self.count("schemas")
            self.note(f"ok  schema {path.name}")
        for name, schema in self.schemas.items():
            self.validators[name] = self.make_validator(schema)
        for name in [f"{c}.schema.json" for c in CHANNELS] + ["job.schema.json"]:
            if name not in self.validators:
                self.fail(f"{name} is missing or invalid")

    def make_validator(self, schema):
        # Cross-file "$ref"s (job.schema.json -> spec.schema.json) resolve against the
        # schemas' "$id"s here, never over the network.
        by_id = {s["$id"]: s for s in self.schemas.values() if "$id" in s}
        try:
            from referencing import Registry, Resource  # jsonschema >= 4.18

            registry = Registry().with_resources(
                (uri, Resource.from_contents(s)) for uri, s in by_id.items())
            return self.Validator(schema, registry=registry)
        except ImportError:
            from jsonschema import RefResolver  # jsonschema < 4.18

            resolver = RefResolver.from_schema(schema, store=by_id)
            return self.Validator(schema, resolver=resolver)

    def errors(self, schema_name, instance):
        v = self.validators[schema_name]
        return sorted(v.iter_errors(instance), key=lambda e: list(e.absolute_path))

    @staticmethod
    def leaves(error):
        """The errors that say what is wrong. Inside a oneOf over message types, only those
        of the branch whose "type" matched count (the others fail on their "type" const);
        when no branch matched, none do (the top-level "type" enum says it)."""
        if not error.context:
            return [error]
        branches = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        out = []
        for subs in branches.values():
            if any(sub.validator == "const" and list(sub.absolute_path)[-1:] == ["type"]
                   for sub in subs):
                continue
            for sub in subs:
                out.extend(Checker.leaves(sub))
        return out

    @staticmethod
    def describe(errors):
        parts = []
        for e in errors:
            for leaf in Checker.leaves(e):
                where = "/".join(str(p) for p in leaf.absolute_path) or "(top)"
                parts.append(f"{where}: {leaf.message[:160]}")
        parts = list(dict.fromkeys(parts))
        return "; ".join(parts[:3]) or "; ".join(e.message[:160] for e in errors[:1])

    # ------------------------------------------------------------------ messages

    def message_types(self, channel):
        schema = self.schemas.get(f"{channel}.schema.json", {})
        types = []
        for branch in schema.get("oneOf", []):
            ref = branch.get("$ref", "")
            target = schema.get("$defs", {}).get(ref.rsplit("/", 1)[-1], {}) if ref else branch
            const = target.get("properties", {}).get("type", {}).get("const")
            if const is not None:
                types.append(const)
        return types

    def load_example(self, path, expect_valid):
        try:
            ex = read_json(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read JSON: {e}") from e
        problems = []
        if not isinstance(ex, dict):
            raise ValueError(f"{path}: an example must be a JSON object")
        if ex.get("channel") not in CHANNELS:
            problems.append(f"\"channel\" must be one of {', '.join(CHANNELS)}")
        frames = ex.get("frames")
        if not isinstance(frames, int) or isinstance(frames, bool) or frames < 0:
            problems.append("\"frames\" must be an integer >= 0")
        if "header" not in ex:
            problems.append("no \"header\"")
        if "schema_can_check" in ex and not isinstance(ex["schema_can_check"], bool):
            problems.append("\"schema_can_check\" must be a boolean")
        if not expect_valid and not isinstance(ex.get("why"), str):
            problems.append("an invalid example must say \"why\" (a string)")
        if expect_valid and ex.get("schema_can_check") is False:
            problems.append("\"schema_can_check\": false only makes sense for an invalid example")
        if problems:
            raise ValueError(f"{path}: " + "; ".join(problems))
        return ex

    def check_messages(self):
        covered = set()
        for kind, expect_valid in (("valid", True), ("invalid", False)):
            files = sorted((self.dir / "examples" / kind).glob("*.json"))
            if not files:
                self.fail(f"no examples in {self.dir / 'examples' / kind}")
            for path in files:
                try:
                    ex = self.load_example(path, expect_valid)
                except ValueError as e:
                    self.fail(str(e))
                    continue
                schema_name = f"{ex['channel']}.schema.json"
                if schema_name not in self.validators:
                    continue  # already reported
                errs = self.errors(schema_name, ex["header"])
                label = f"{kind}/{path.name}"
                if expect_valid:
                    self.count("valid examples")
                    if errs:
                        self.fail(f"{label}: the {ex['channel']} schema rejects a valid example: "
                                  f"{self.describe(errs)}")
                    else:
                        covered.add((ex["channel"], ex["header"].get("type")))
                        self.note(f"ok  {label}")
                elif ex.get("schema_can_check", True):
                    self.count("invalid examples (schema rejects)")
                    if not errs:
                        self.fail(f"{label}: the {ex['channel']} schema accepts an invalid example "
                                  f"({ex['why']})")
                    else:
                        self.note(f"ok  {label}: {self.describe(errs)}")
                else:
                    self.count("invalid examples (C++ only)")
                    if errs:
                        self.fail(f"{label}: marked \"schema_can_check\": false, so the schema must "
                                  f"accept it and leave it to the C++ validator, but it rejects it: "
                                  f"{self.describe(errs)}")
                    else:
                        self.note(f"ok  {label} (C++ only: {ex['why']})")
        for channel in CHANNELS:
            types = self.message_types(channel)
            if not types:
                self.fail(f"{channel}.schema.json: no message types found in its oneOf")
            for t in types:
                self.count("message types")
                if (channel, t) not in covered:
                    self.fail(f"{channel} \"{t}\": no valid example in examples/valid/")

    # ------------------------------------------------------------------ jobs

    JOB_BREAKAGES = (
        ("job_id not 32 hex digits", lambda j: j.__setitem__("job_id", j["job_id"].upper())),
        ("unknown kind", lambda j: j.__setitem__("kind", "download")),
        ("unknown state", lambda j: j.__setitem__("state", "done")),
        ("no job_id", lambda j: j.pop("job_id")),
        ("negative attempts", lambda j: j.__setitem__("attempts", -1)),
        ("created_ms a string", lambda j: j.__setitem__("created_ms", "1795686001123")),
    )

    def check_jobs(self):
        if "job.schema.json" not in self.validators:
            return
        files = sorted((self.dir / "examples" / "jobs").glob("*.json"))
        if not files:
            self.fail(f"no job examples in {self.dir / 'examples' / 'jobs'}")
        for path in files:
            try:
                job = read_json(path)
            except (OSError, ValueError) as e:
                self.fail(f"{path}: cannot read JSON: {e}")
                continue
            self.count("job examples")
            errs = self.errors("job.schema.json", job)
            if errs:
                self.fail(f"jobs/{path.name}: job.schema.json rejects it: {self.describe(errs)}")
                continue
            self.note(f"ok  jobs/{path.name}")
            for what, breakage in self.JOB_BREAKAGES + self.state_breakages(job):
                broken = copy.deepcopy(job)
                try:
                    breakage(broken)
                except KeyError:
                    continue
                self.count("broken job copies")
                if not self.errors("job.schema.json", broken):
                    self.fail(f"jobs/{path.name} with {what}: job.schema.json accepts it")

    @staticmethod
    def state_breakages(job):
        state = job.get("state")
        if state == "finished":
            return (("no result", lambda j: j.pop("result")),
                    ("the other kind's result",
                     lambda j: j.__setitem__("kind", "upload" if j["kind"] == "query" else "query")))
        if state == "failed":
            return (("no error", lambda j: j.pop("error")),
                    ("dead_letter a string", lambda j: j.__setitem__("dead_letter", "no")))
        return (("a result while not ended", lambda j: j.__setitem__("result", {})),)

    # ------------------------------------------------------------------ run

    def run(self):
        self.load_schemas()
        self.check_messages()
        self.check_jobs()
        summary = ", ".join(f"{n} {k}" for k, n in self.counts.items())
        if self.failures:
            print(f"check_schemas: {len(self.failures)} mismatch(es):", file=sys.stderr)
            for f in self.failures:
                print(f"  FAIL {f}", file=sys.stderr)
            print(f"checked {summary}", file=sys.stderr)
            return 1
        print(f"check_schemas: OK: {summary}")
        return 0


def main(argv=None):
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(
        prog="check_schemas.py",
        description=__doc__.split("\n\n")[0] + " Validates every schema, then every example "
        "under schemas/examples/ against its channel's schema (valid/ must pass; invalid/ must "
        "fail unless marked \"schema_can_check\": false), and the job objects in "
        "schemas/examples/jobs/ against job.schema.json.",
        epilog="Example files: {\"channel\": \"client-to-broker\"|\"broker-to-client\"|"
        "\"worker-to-broker\"|\"broker-to-worker\", \"frames\": N, \"header\": {...}, "
        "\"why\": \"(invalid only) what is wrong\", \"schema_can_check\": false (optional)}. "
        "Exit status: 0 all agree, 1 a mismatch or a malformed example, 2 bad usage, "
        "77 jsonschema missing.",
    )
    parser.add_argument("--schemas-dir", type=Path, default=here.parent / "schemas",
                        help="the schemas directory (default: %(default)s)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every check")
    args = parser.parse_args(argv)
    if not args.schemas_dir.is_dir():
        parser.error(f"{args.schemas_dir} is not a directory")
    return Checker(args.schemas_dir, args.verbose).run()


if __name__ == "__main__":
    sys.exit(main())
