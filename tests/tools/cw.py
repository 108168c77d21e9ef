#!/usr/bin/env python3
"""Reads CloudWatch (moto in the tests) through boto3, as a scaler would.

    cw.py ENDPOINT OPERATION JSON_ARGS

calls the client's OPERATION (e.g. get_metric_statistics, list_metrics) with JSON_ARGS and
prints the response as JSON. Timestamps in arguments are Unix seconds.
"""
import json
import sys

import boto3


def main():
    endpoint, operation, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = boto3.client(
        "cloudwatch",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )
    response = getattr(client, operation)(**args)
    response.pop("ResponseMetadata", None)
    json.dump(response, sys.stdout, default=lambda o: o.timestamp() if hasattr(o, "timestamp") else str(o))


if __name__ == "__main__":
    main()
