"""The CDK app: `cdk synth` / `cdk deploy` from ops/aws (cdk.json runs this module).

The account and region come from the CDK CLI's environment (your AWS profile) when it
has them; without them the stack synthesises environment-agnostic, as CI does.
"""

from __future__ import annotations

import os

import aws_cdk as cdk

from ops.aws.stack import CarelogStack


def build(app: cdk.App) -> CarelogStack:
    """The carelog stack in `app`, with the app's context."""
    account, region = os.environ.get("CDK_DEFAULT_ACCOUNT"), os.environ.get("CDK_DEFAULT_REGION")
    env = cdk.Environment(account=account, region=region) if account and region else None
    return CarelogStack(
        app,
        str(app.node.try_get_context("stack_name") or "Carelog"),
        env=env,
        description="carelog: event-sourced practice platform (ECS Fargate, RDS, MSK, Redis)",
    )


def main() -> None:
    app = cdk.App()
    build(app)
    app.synth()


if __name__ == "__main__":
    main()
