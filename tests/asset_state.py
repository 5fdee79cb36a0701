"""Read and write the asset state store in Airflow's DB from a test (as the DAGs' tasks would)."""

from __future__ import annotations

import json
from typing import Any


def write_asset_state(asset_name: str, key: str, value: Any) -> None:
    """Set ``key`` of asset ``asset_name`` (created when no DAG registered it yet)."""
    from airflow._shared.state import AssetStateStoreWriterKind
    from airflow.models.asset import AssetActive, AssetModel
    from airflow.state import AssetScope
    from airflow.state.metastore import MetastoreBackend
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        asset = session.scalar(select(AssetModel).where(AssetModel.name == asset_name))
        if asset is None:
            asset = AssetModel(name=asset_name, uri=asset_name)
            session.add(asset)
            session.flush()
            session.add(AssetActive.for_asset(asset))
            session.flush()
        MetastoreBackend().set_asset_state_store(AssetScope(asset_id=asset.id), key, json.dumps(value),
                                                 kind=AssetStateStoreWriterKind.API, session=session)


def read_asset_state(asset_name: str, key: str) -> Any:
    """The value of ``key`` of asset ``asset_name``, or None."""
    from airflow.models.asset import AssetModel
    from airflow.models.asset_state_store import AssetStateStoreModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalars(select(AssetStateStoreModel).join(AssetModel, AssetStateStoreModel.asset_id == AssetModel.id)
                              .where(AssetModel.name == asset_name, AssetStateStoreModel.key == key)).one_or_none()
        return None if row is None else json.loads(row.value)
