package org.ppml.flink;

import java.io.IOException;
import org.apache.flink.api.common.serialization.BulkWriter;
import org.apache.flink.connector.file.sink.FileSink;
import org.apache.flink.core.fs.FSDataOutputStream;
import org.apache.flink.core.fs.Path;
import org.apache.flink.streaming.api.functions.sink.filesystem.OutputFileConfig;
import org.apache.flink.streaming.api.functions.sink.filesystem.PartFileInfo;
import org.apache.flink.streaming.api.functions.sink.filesystem.bucketassigners.BasePathBucketAssigner;
import org.apache.flink.streaming.api.functions.sink.filesystem.rollingpolicies.CheckpointRollingPolicy;

/**
 * Flink's file sink for files that are already complete and encrypted: each record is the
 * whole content of one part file (a ppml encrypted file made by a Python operator). A part is
 * written as a hidden in-progress file and gets its final name only when the checkpoint that
 * covers it completes, so the directory shows only complete parts, each once (exactly once
 * with checkpointing on).
 */
public final class EncryptedParts {
    private EncryptedParts() {}

    /** The sink writing into {@code basePath}: parts named {@code prefix-<id>-<n><suffix>}. */
    public static FileSink<byte[]> sink(String basePath, String prefix, String suffix) {
        return FileSink.forBulkFormat(new Path(basePath), new WholeFile())
                .withBucketAssigner(new BasePathBucketAssigner<>())
                .withRollingPolicy(new OnePerPart())
                .withOutputFileConfig(
                        OutputFileConfig.builder()
                                .withPartPrefix(prefix)
                                .withPartSuffix(suffix)
                                .build())
                .build();
    }

    /** Writes each record's bytes as they are. */
    static final class WholeFile implements BulkWriter.Factory<byte[]> {
        private static final long serialVersionUID = 1L;

        @Override
        public BulkWriter<byte[]> create(FSDataOutputStream out) {
            return new BulkWriter<byte[]>() {
                @Override
                public void addElement(byte[] element) throws IOException {
                    out.write(element);
                }

                @Override
                public void flush() throws IOException {
                    out.flush();
                }

                @Override
                public void finish() throws IOException {
                    out.flush();
                }
            };
        }
    }

    /** A new part for every record (one encrypted file each), and at every checkpoint. */
    static final class OnePerPart extends CheckpointRollingPolicy<byte[], String> {
        private static final long serialVersionUID = 1L;

        @Override
        public boolean shouldRollOnEvent(PartFileInfo<String> part, byte[] element) {
            return true;
        }

        @Override
        public boolean shouldRollOnProcessingTime(PartFileInfo<String> part, long now) {
            return false;
        }
    }
}
