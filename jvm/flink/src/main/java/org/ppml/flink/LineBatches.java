package org.ppml.flink;

import java.util.ArrayList;
import java.util.List;
import org.apache.flink.api.common.operators.ProcessingTimeService.ProcessingTimeCallback;
import org.apache.flink.api.common.state.ListState;
import org.apache.flink.api.common.state.ListStateDescriptor;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.runtime.state.StateInitializationContext;
import org.apache.flink.runtime.state.StateSnapshotContext;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.streaming.api.operators.AbstractStreamOperator;
import org.apache.flink.streaming.api.operators.BoundedOneInput;
import org.apache.flink.streaming.api.operators.OneInputStreamOperator;
import org.apache.flink.streaming.runtime.streamrecord.StreamRecord;

/**
 * Lines into the contents of part files: {@code records} lines each, or fewer once {@code
 * rollMs} has passed since a part's first line, or at the end of the input. One record out per
 * part (the lines, each ended by a newline), which a Python operator then encrypts whole. The
 * lines of the part being filled are operator state, saved with every checkpoint, so together
 * with the file sink each line lands in exactly one committed part. Buffering here, in the JVM,
 * keeps the per-line work out of the Python interpreter.
 */
public final class LineBatches extends AbstractStreamOperator<String>
        implements OneInputStreamOperator<String, String>, BoundedOneInput, ProcessingTimeCallback {
    private static final long serialVersionUID = 1L;

    private final int records;
    private final long rollMs;
    private transient List<String> lines;
    private transient ListState<String> saved;
    private transient long deadline;

    private LineBatches(int records, long rollMs) {
        if (records < 1 || rollMs < 1) {
            throw new IllegalArgumentException("records and rollMs must be positive");
        }
        this.records = records;
        this.rollMs = rollMs;
    }

    /** {@code in}'s lines batched into part contents (chained to the operator before it). */
    public static SingleOutputStreamOperator<String> apply(
            DataStream<String> in, int records, long rollMs, String name) {
        return in.transform(name, Types.STRING, new LineBatches(records, rollMs));
    }

    @Override
    public void initializeState(StateInitializationContext context) throws Exception {
        super.initializeState(context);
        saved =
                context.getOperatorStateStore()
                        .getListState(new ListStateDescriptor<>("ppml-part-lines", Types.STRING));
        lines = new ArrayList<>();
        for (String line : saved.get()) {
            lines.add(line);
        }
        deadline = -1;
    }

    @Override
    public void open() throws Exception {
        super.open();
        if (!lines.isEmpty()) {
            schedule();
        }
    }

    @Override
    public void processElement(StreamRecord<String> element) throws Exception {
        if (lines.isEmpty()) {
            schedule();
        }
        lines.add(element.getValue());
        if (lines.size() >= records) {
            flush();
        }
    }

    @Override
    public void onProcessingTime(long time) throws Exception {
        // A timer of a part already written by count fires early for the next one: skip it.
        if (deadline >= 0 && time >= deadline) {
            flush();
        }
    }

    @Override
    public void endInput() throws Exception {
        flush();
    }

    @Override
    public void snapshotState(StateSnapshotContext context) throws Exception {
        super.snapshotState(context);
        saved.update(lines);
    }

    private void schedule() {
        deadline = getProcessingTimeService().getCurrentProcessingTime() + rollMs;
        getProcessingTimeService().registerTimer(deadline, this);
    }

    private void flush() {
        deadline = -1;
        if (lines.isEmpty()) {
            return;
        }
        StringBuilder part = new StringBuilder();
        for (String line : lines) {
            part.append(line).append('\n');
        }
        lines.clear();
        output.collect(new StreamRecord<>(part.toString()));
    }
}
