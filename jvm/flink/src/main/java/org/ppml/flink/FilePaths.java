package org.ppml.flink;

import java.io.IOException;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.connector.file.src.FileSourceSplit;
import org.apache.flink.connector.file.src.reader.BulkFormat;
import org.apache.flink.connector.file.src.util.CheckpointedPosition;
import org.apache.flink.connector.file.src.util.SingletonResultIterator;

/**
 * A file format that reads nothing: each file yields one record, its path. ppml's encrypted
 * files are decrypted and authenticated by a Python operator that opens the path itself (so
 * that the data key stays in that operator); Flink's file source still does the listing, the
 * continuous monitoring and the checkpointing of which files are done.
 */
public final class FilePaths implements BulkFormat<String, FileSourceSplit> {
    private static final long serialVersionUID = 1L;

    @Override
    public Reader<String> createReader(Configuration config, FileSourceSplit split) {
        return new PathReader(split.path().toString(), false);
    }

    @Override
    public Reader<String> restoreReader(Configuration config, FileSourceSplit split) {
        // A restored split whose one record was already emitted has nothing more to give.
        boolean done = split.getReaderPosition()
                .map(p -> p.getRecordsAfterOffset() > 0)
                .orElse(false);
        return new PathReader(split.path().toString(), done);
    }

    @Override
    public boolean isSplittable() {
        return false;
    }

    @Override
    public TypeInformation<String> getProducedType() {
        return Types.STRING;
    }

    private static final class PathReader implements BulkFormat.Reader<String> {
        private final String path;
        private boolean emitted;

        PathReader(String path, boolean emitted) {
            this.path = path;
            this.emitted = emitted;
        }

        @Override
        public RecordIterator<String> readBatch() {
            if (emitted) {
                return null;
            }
            emitted = true;
            SingletonResultIterator<String> one = new SingletonResultIterator<>();
            one.set(path, CheckpointedPosition.NO_OFFSET, 1);
            return one;
        }

        @Override
        public void close() throws IOException {}
    }
}
