"""SQL system of record (SQLAlchemy 2.0): schema, migrations, repositories."""
