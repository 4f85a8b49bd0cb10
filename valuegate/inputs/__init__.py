"""Input reading: the files people have, as rows, and the sample shapes those rows form (docs/your-data.md).

- :mod:`valuegate.inputs.readers`: files and folders as chunks of raw rows (JSON lines, a JSON array,
  CSV, Parquet, Arrow, a ``datasets`` ``save_to_disk`` folder, a folder or glob of shards);
- :mod:`valuegate.inputs.formats`: which format a file's columns are (prompt/response, OpenAI messages,
  ShareGPT, Alpaca, text, or a column mapping) and each row in the canonical fields;
- :mod:`valuegate.inputs.rows`: the row checks that turn canonical fields into a
  :class:`~valuegate.engine.sample.Sample` or a reason.

Nothing here touches the workspace; ``tasks/ingest.py`` stores what these read.
"""
