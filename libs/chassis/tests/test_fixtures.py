"""The shared test fixtures start real servers: S3 (SeaweedFS), PostgreSQL, NATS with JetStream."""

from __future__ import annotations

import os

import boto3
import nats
import pytest
import sqlalchemy as sa
from botocore.config import Config


def _s3(server):
    return boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                        aws_access_key_id=server.extra["access_key"],
                        aws_secret_access_key=server.extra["secret_key"],
                        config=Config(retries={"max_attempts": 2}))


def test_s3_server_round_trips_objects_and_multipart_uploads(s3_server):
    s3 = _s3(s3_server)
    s3.create_bucket(Bucket="fixture-check")
    s3.put_object(Bucket="fixture-check", Key="small", Body=b"hello")
    assert s3.get_object(Bucket="fixture-check", Key="small")["Body"].read() == b"hello"
    parts = [os.urandom(5 * 1024 * 1024), os.urandom(1024)]
    upload = s3.create_multipart_upload(Bucket="fixture-check", Key="big")
    etags = [s3.upload_part(Bucket="fixture-check", Key="big", UploadId=upload["UploadId"], PartNumber=i + 1,
                            Body=part)["ETag"] for i, part in enumerate(parts)]
    s3.complete_multipart_upload(Bucket="fixture-check", Key="big", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": [{"ETag": e, "PartNumber": i + 1}
                                                            for i, e in enumerate(etags)]})
    assert s3.get_object(Bucket="fixture-check", Key="big")["Body"].read() == b"".join(parts)


def test_s3_server_rejects_wrong_credentials(s3_server):
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1",
                      aws_access_key_id="nobody", aws_secret_access_key="wrong")
    with pytest.raises(ClientError):
        s3.list_buckets()


def test_postgres_url_is_a_fresh_empty_database(postgres_url):
    engine = sa.create_engine(postgres_url)
    with engine.begin() as conn:
        assert conn.execute(sa.text("select count(*) from pg_tables where schemaname = 'public'")).scalar() == 0
        conn.execute(sa.text("create table t (x int)"))
    engine.dispose()


async def test_nats_server_has_jetstream_on_a_free_port(nats_server):
    assert not nats_server.url.endswith(":4222")
    nc = await nats.connect(nats_server.url)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()
