"""The scan session: encrypted Parquet files as lazy pyarrow datasets for an engine (DuckDB),
keys unwrapped on the calling thread before any scan thread needs them."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from ppml.crypto.envelope import DataKeyProvider
from ppml.data.parquet.footer import require_encrypted
from ppml.data.parquet.kms import KeySession, locate
from ppml.errors import IntegrityError, PPMLError, UsageError

if TYPE_CHECKING:
    import pyarrow.dataset as ds

__all__ = ["ParquetScanSession"]

_log = logging.getLogger(__name__)


class ParquetScanSession:
    """Encrypted Parquet files as lazy pyarrow datasets, for an engine that scans them (DuckDB).

    A dataset reads nothing but footers when made; a scan reads and decrypts only the row groups
    and columns it asks for, as it runs, with projections and filters pushed into it. Every
    dataset of a session shares one key session: the provider is asked once per named key and
    file (the footer key, then each column key a scan needs), and every key is dropped on close.

    A scan that fails inside the engine surfaces as the engine's error; `failure` then holds the
    provider's own error, if any, and `verify` tells tampering from anything else.
    """

    def __init__(self, provider: DataKeyProvider) -> None:
        self._session = KeySession(provider, Path("."))
        self._format = self._session.dataset_format()

    def __enter__(self) -> ParquetScanSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.__exit__(None, None, None)

    @property
    def failure(self) -> BaseException | None:
        """The provider's first error in this session (missing key, access denied), if any."""
        return self._session.failure

    def released_key_encryption_keys(self) -> dict[tuple[str, str], bytes]:
        """The key-encryption keys unwrapped so far, by (master key id, wrapped key text).

        These are what another Parquet reader (Spark's JVM reader, through ppml's KMS client
        there) needs to read the same files without asking the KMS again; the caller owns
        handing them only to readers of those files.
        """
        return self._session.released_key_encryption_keys()

    def dataset(self, paths: Sequence[Path]) -> ds.Dataset:
        """One dataset over encrypted Parquet files (the parts of one table): their footers are
        decrypted now (schemas, row group statistics), their columns only when scanned."""
        import pyarrow.dataset as ds
        import pyarrow.fs as pafs

        local = pafs.LocalFileSystem()
        files = [Path(p).absolute() for p in paths]
        if not files:
            raise UsageError("no Parquet files to read")
        schemas = []
        for path in files:
            require_encrypted(path)
            with self._guard(path):
                schemas.append(self._format.inspect(str(path), filesystem=local))
        if len(schemas) == 1:
            schema = schemas[0]
        else:
            try:
                schema = pa.unify_schemas(schemas, promote_options="default")
            except (pa.ArrowException, TypeError):
                raise UsageError(
                    "the Parquet parts have incompatible schemas", path=files[0].parent
                ) from None
        # Footers are decrypted here, on this thread, and kept in the fragments: a scan then
        # needs no footer key. pyarrow unwraps a key while holding its key cache's lock, so a
        # thread holding the GIL that waited on that lock (to open a footer while the engine
        # scans) would deadlock with a scan thread waiting for the GIL to call the provider.
        fragments: list[ds.ParquetFileFragment] = []
        for path in files:
            with self._guard(path):
                fragment = self._format.make_fragment(str(path), filesystem=local)
                assert isinstance(fragment, ds.ParquetFileFragment)
                fragment.ensure_complete_metadata()
                fragments.append(fragment)
        dataset = _prewarming_dataset_class()(
            list[ds.Fragment](fragments), schema.remove_metadata(), self._format, local
        )
        # Column keys are the same deadlock waiting to happen: a scan thread would unwrap them
        # while the engine's thread holds the GIL. So each scan first unwraps, on the calling
        # thread, the keys of the columns it may read (projected or named in its filter).
        dataset._ppml_prewarm = lambda columns, filter_: self._prewarm(  # type: ignore[attr-defined]
            list(zip(files, fragments, strict=True)), schema.names, columns, filter_
        )
        return dataset

    def _prewarm(
        self,
        parts: Sequence[tuple[Path, ds.ParquetFileFragment]],
        names: Sequence[str],
        columns: Any,
        filter_: Any,
    ) -> None:
        needed = set(names) if columns is None else {str(c) for c in columns}
        if filter_ is not None:
            # Field names in the expression's text, string literals removed: conservative (a
            # name inside another token is not taken; a literal naming a column is dropped).
            text = re.sub(r'"(?:[^"\\]|\\.)*"', "", str(filter_))
            needed |= {n for n in names if re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", text)}
        from ppml.data.pme import PMEFile

        for path, fragment in parts:
            present = [n for n in fragment.physical_schema.names if n in needed]
            if not present:
                continue
            # The keys are read from the file's own key material (footer, then column crypto
            # metadata) and unwrapped here, through the session's client: a refusal is raised
            # here, as the provider raised it, and reading no data.
            with self._guard(path), PMEFile(path, self._session.unwrap_key) as pme:
                leaves = pme.column_key_leaves(present)
                if leaves and fragment.metadata.num_row_groups:
                    # Column keys other than the footer's: have pyarrow unwrap them into its
                    # own cache now, on this thread, so that no scan thread calls back into
                    # Python. Each is already unwrapped above, so this asks nothing of the
                    # provider and cannot fail (a refusal there would abort the process).
                    group = fragment.metadata.row_group(0)
                    for leaf in leaves:
                        group.column(leaf)

    def inspect(self, path: Path) -> tuple[pa.Schema, int]:
        """An encrypted file's schema and number of row groups, with every key it holds
        unwrapped now through the session (refusals raised here, as the provider raised them):
        what a reader elsewhere (Spark's) needs, without decrypting any data."""
        from ppml.data.pme import PMEFile

        path = Path(path)
        with self._guard(path), PMEFile(path, self._session.unwrap_key) as pme:
            pme.unwrap_column_keys()
            footer = pme.plaintext_footer_schema_only()
            try:
                schema = pq.read_schema(pa.BufferReader(footer))
            except (OSError, pa.ArrowException):
                raise IntegrityError(path=path) from None
            return schema, pme.num_row_groups

    def unwrap_keys(self, dataset: ds.Dataset, columns: Sequence[str] | None = None) -> None:
        """Unwrap now, on this thread, the keys a scan of `columns` (default: all) of a dataset
        of this session needs: the provider's refusal is raised here, as the provider raised
        it, and the scan itself asks the provider nothing."""
        dataset._ppml_prewarm(columns, None)  # type: ignore[attr-defined]

    def verify(self, paths: Sequence[Path], *, columns: Sequence[str] | None = None) -> None:
        """Decrypt `columns` (default: all) of every row group of `paths` and discard them:
        IntegrityError (or the provider's error) for the first file that does not decrypt."""
        for path in paths:
            path = Path(path)
            require_encrypted(path)
            with self._guard(path):
                props = self._session.decryption_properties()
                with pq.ParquetFile(path, decryption_properties=props) as pf:
                    names = pf.schema_arrow.names
                    present = None if columns is None else [c for c in columns if c in names]
                    for index in range(pf.num_row_groups):
                        pf.read_row_group(index, columns=present)

    def located(self, exc: BaseException, path: Path) -> BaseException:
        """`exc` (a provider failure) with `path` attached; integrity failures stay opaque."""
        return locate(exc, path)

    @contextlib.contextmanager
    def _guard(self, path: Path) -> Iterator[None]:
        try:
            yield
        except PPMLError as exc:
            raise locate(self._session.failure or exc, path) from None
        except (OSError, pa.ArrowException) as exc:
            if self._session.failure is not None:
                raise locate(self._session.failure, path) from None
            _log.debug("parquet decryption failed for %s: %s", path, exc)
            raise IntegrityError(path=path) from None


@functools.cache
def _prewarming_dataset_class() -> type[ds.FileSystemDataset]:
    import pyarrow.dataset as ds

    class PrewarmingDataset(ds.FileSystemDataset):
        """A dataset whose scans unwrap the keys they need before any scan thread starts."""

        def scanner(self, *args: Any, **kwargs: Any) -> ds.Scanner:
            self._ppml_prewarm(kwargs.get("columns"), kwargs.get("filter"))  # type: ignore[attr-defined]
            return super().scanner(*args, **kwargs)

        def to_table(self, *args: Any, **kwargs: Any) -> pa.Table:
            self._ppml_prewarm(kwargs.get("columns"), kwargs.get("filter"))  # type: ignore[attr-defined]
            return super().to_table(*args, **kwargs)

        def to_batches(self, *args: Any, **kwargs: Any) -> Iterator[pa.RecordBatch]:
            self._ppml_prewarm(kwargs.get("columns"), kwargs.get("filter"))  # type: ignore[attr-defined]
            return super().to_batches(*args, **kwargs)

    return PrewarmingDataset
