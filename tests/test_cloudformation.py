"""deploy/aws/hlsvault.yaml: cfn-lint finds nothing, and the stack is created on the moto server
for every resource type moto's CloudFormation supports; a job then runs against the buckets it
created, reading its settings from the stack's outputs.

moto (5.x) creates AWS::S3::Bucket, AWS::SQS::Queue and AWS::IAM::ManagedPolicy. It has no
CloudFormation model for AWS::S3::BucketPolicy, AWS::SQS::QueuePolicy,
AWS::SecretsManager::Secret or any AWS::CloudFront::* type: those are left out of the stack made
here (references to them become placeholders), and what they do is covered elsewhere (the
CloudFront stand-in enforces what the distribution and key group do: tests/test_cdn_signing.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

from fleet import MotoServer
from keyserver_support import isolated_env
from support import CLI_TIMEOUT_S, HLSVAULT, ROOT, VENV_BIN

TEMPLATE = ROOT / "deploy" / "aws" / "hlsvault.yaml"
#: What moto's CloudFormation creates (and this test expects the template to use).
MOTO_TYPES = frozenset({"AWS::S3::Bucket", "AWS::SQS::Queue", "AWS::IAM::ManagedPolicy"})
NOT_IN_MOTO = frozenset({
    "AWS::S3::BucketPolicy", "AWS::SQS::QueuePolicy", "AWS::SecretsManager::Secret",
    "AWS::CloudFront::OriginAccessControl", "AWS::CloudFront::PublicKey",
    "AWS::CloudFront::KeyGroup", "AWS::CloudFront::CachePolicy",
    "AWS::CloudFront::ResponseHeadersPolicy", "AWS::CloudFront::Distribution",
})
_SUB_NAME = re.compile(r"\$\{([A-Za-z0-9]+)(?:\.[A-Za-z0-9]+)?\}")


def template() -> dict[str, Any]:
    from cfnlint.decode import decode

    loaded, problems = decode(str(TEMPLATE))
    assert not problems, problems
    return json.loads(json.dumps(loaded))  # plain dicts and lists


def placeholder(name: str) -> str:
    """What a reference to a resource moto cannot create becomes: an ARN naming nothing (IAM
    policies refuse resources that are not ARNs)."""
    return f"arn:aws:removed:us-east-1:123456789012:removed-{name}"


def without(document: Any, removed: set[str]) -> Any:
    """``document`` with every reference to a ``removed`` resource made a placeholder."""
    if isinstance(document, dict):
        if set(document) == {"Ref"} and document["Ref"] in removed:
            return placeholder(document["Ref"])
        if set(document) == {"Fn::GetAtt"} and document["Fn::GetAtt"][0] in removed:
            return placeholder(document["Fn::GetAtt"][0])
        if set(document) == {"Fn::Sub"} and isinstance(document["Fn::Sub"], str):
            text = _SUB_NAME.sub(
                lambda m: f"removed-{m.group(1)}" if m.group(1) in removed else m.group(0),
                document["Fn::Sub"],
            )
            return {"Fn::Sub": text}
        return {k: without(v, removed) for k, v in document.items() if k != "DependsOn"
                or v not in removed}
    if isinstance(document, list):
        return [without(item, removed) for item in document]
    return document


def moto_subset(full: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    removed = {name for name, r in full["Resources"].items() if r["Type"] not in MOTO_TYPES}
    subset = without(full, removed)
    subset["Resources"] = {n: r for n, r in subset["Resources"].items() if n not in removed}
    # SourcesBucket's notification needs the queue policy, which moto cannot create.
    subset["Resources"]["SourcesBucket"]["Properties"].pop("NotificationConfiguration", None)
    subset["Outputs"] = {
        n: o for n, o in subset["Outputs"].items() if "removed-" not in json.dumps(o)
    }
    return subset, removed


def test_cfn_lint_finds_nothing() -> None:
    done = subprocess.run([str(VENV_BIN / "cfn-lint"), str(TEMPLATE)], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_template_has_what_the_issue_asks_for() -> None:
    resources = template()["Resources"]
    types = {r["Type"] for r in resources.values()}
    assert {r["Type"] for r in resources.values()} <= MOTO_TYPES | NOT_IN_MOTO
    assert {"AWS::CloudFront::KeyGroup", "AWS::CloudFront::OriginAccessControl"} <= types
    behaviours = resources["Distribution"]["Properties"]["DistributionConfig"]["CacheBehaviors"]
    assets = next(b for b in behaviours if b["PathPattern"] == "/assets/*")
    assert assets["TrustedKeyGroups"] == [{"Ref": "KeyGroup"}]
    cache = resources["SegmentCachePolicy"]["Properties"]["CachePolicyConfig"]
    keyed = cache["ParametersInCacheKeyAndForwardedToOrigin"]
    assert keyed["QueryStringsConfig"]["QueryStringBehavior"] == "none"
    assert keyed["CookiesConfig"]["CookieBehavior"] == "none"
    # The key server reads the vault and never writes it; only it reads the CloudFront key.
    key_server = json.dumps(resources["KeyServerPolicy"])
    assert "s3:PutObject" not in key_server and "s3:DeleteObject" not in key_server
    readers = [name for name, r in resources.items() if r["Type"] == "AWS::IAM::ManagedPolicy"
               and "CloudFrontPrivateKeySecret" in json.dumps(r)]
    assert readers == ["KeyServerPolicy"]
    lifecycle = resources["WorkBucket"]["Properties"]["LifecycleConfiguration"]["Rules"][0]
    assert lifecycle["ExpirationInDays"] == {"Ref": "WorkExpiryDays"}
    queue = resources["IngestQueue"]["Properties"]["RedrivePolicy"]
    assert queue["deadLetterTargetArn"] == {"Fn::GetAtt": ["IngestDeadLetterQueue", "Arn"]}


def test_a_job_runs_against_the_stack_moto_creates(
    moto_server: MotoServer, copy_clip: Path, tmp_path: Path
) -> None:
    # Given the stack, as far as moto creates it
    subset, removed = moto_subset(template())
    assert {template()["Resources"][n]["Type"] for n in removed} <= NOT_IN_MOTO
    cloudformation = moto_server.client("cloudformation")
    name = f"hlsvault-{uuid.uuid4().hex[:8]}"
    cloudformation.create_stack(
        StackName=name, TemplateBody=json.dumps(subset),
        Parameters=[
            {"ParameterKey": "CloudFrontPublicKey", "ParameterValue": "unused by moto"},
            {"ParameterKey": "PlayerOrigins", "ParameterValue": "https://app.example"},
        ],
    )
    (stack,) = cloudformation.describe_stacks(StackName=name)["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE", stack
    settings = {o["Description"].split()[0]: o["OutputValue"] for o in stack["Outputs"]
                if o["Description"].startswith("HLSVAULT_")}
    assert set(settings) >= {"HLSVAULT_ORIGIN", "HLSVAULT_VAULT", "HLSVAULT_WORK",
                             "HLSVAULT_SOURCE_BUCKETS", "HLSVAULT_INGEST_QUEUE_URL"}
    s3 = moto_server.client("s3")
    sources = settings["HLSVAULT_SOURCE_BUCKETS"]
    s3.upload_file(str(copy_clip), sources, "uploads/clip.mp4")

    # When a job runs with the settings the stack's outputs give
    env = {k: v for k, v in isolated_env(tmp_path / "data").items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=moto_server.endpoint, AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        **{k: settings[k] for k in ("HLSVAULT_ORIGIN", "HLSVAULT_VAULT", "HLSVAULT_WORK",
                                    "HLSVAULT_SOURCE_BUCKETS")},
    )
    done = subprocess.run(
        [*HLSVAULT, "package", f"s3://{sources}/uploads/clip.mp4", "--asset", "stacked",
         "--ladder", "copy", "--download", "--json"],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
        cwd=tmp_path,
    )

    # Then it published into the stack's buckets: segments and the MP4 in the origin, keys
    # and the catalog in the vault, nothing left in the work bucket
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    origin = settings["HLSVAULT_ORIGIN"].removeprefix("s3://")
    vault, vault_prefix = settings["HLSVAULT_VAULT"].removeprefix("s3://").split("/", 1)
    work, work_prefix = settings["HLSVAULT_WORK"].removeprefix("s3://").split("/", 1)

    def keys(bucket: str, prefix: str) -> list[str]:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for item in listed.get("Contents", [])]

    assert any(k.endswith(".ts") for k in keys(origin, "assets/stacked/"))
    assert keys(origin, "downloads/stacked/") == [
        f"downloads/stacked/{summary['version']}/stacked.mp4"]
    assert keys(vault, f"{vault_prefix}/keys/stacked/")
    assert keys(vault, f"{vault_prefix}/catalog/stacked/")
    assert keys(work, f"{work_prefix}/jobs/") == []
