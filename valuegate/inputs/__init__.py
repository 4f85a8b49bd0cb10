"""Input reading: the files people have, as rows, and the sample shapes those rows form (docs/your-data.md).

- :mod:`valuegate.inputs.readers`: files and folders as chunks of raw rows (JSON lines, a JSON array,
  CSV, Parquet, Arrow, a ``datasets`` ``save_to_disk`` folder, a folder or glob of shards);
- :mod:`valuegate.inputs.formats`: which format a file's columns are (prompt/response, OpenAI messages,
  ShareGPT, Alpaca, text, or a column mapping) and each row in the canonical fields;
- :mod:`valuegate.inputs.rows`: the row checks that turn canonical fields into a
  :class:`~valuegate.engine.sample.Sample` or a reason;
- :mod:`valuegate.inputs.verdicts`: every row of a source with its verdict (kept sample and other columns,
  or the reason), chunk by chunk, nothing dropped;
- :mod:`valuegate.inputs.identity`: a sample's normalised record and its content id;
- :mod:`valuegate.inputs.values`: a JSON-able stand-in of any cell (bytes described, never inlined).

Nothing here touches the workspace; ``tasks/ingest.py`` stores what these read.
"""
