"""carelog on AWS, as code: an AWS CDK (v2) app that synthesises the production stack.

`app.py` is the app, `stack.py` the stack, `services.py` the table of carelog processes it
runs on ECS Fargate. `cdk synth` needs neither AWS credentials nor Docker: the images are
named by URI (context), not built. See docs/deploy.md, section "AWS".
"""
