package org.ppml.flink;

import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.connector.source.util.ratelimit.RateLimiterStrategy;
import org.apache.flink.connector.datagen.source.DataGeneratorSource;
import org.apache.flink.connector.datagen.source.GeneratorFunction;

/**
 * A rate-limited stream of numbers (0, 1, 2, ...): the clock that drives ppml's
 * polling sources (a Redis stream, a directory), whose reads happen in Python operators.
 * The source is checkpointed, so after a restore it continues where the checkpoint was.
 */
public final class Ticks implements GeneratorFunction<Long, Long> {
    private static final long serialVersionUID = 1L;

    @Override
    public Long map(Long index) {
        return index;
    }

    /**
     * A source of {@code count} ticks ({@code Long.MAX_VALUE}: unbounded), at most {@code
     * perSecond} per second over all subtasks.
     */
    public static DataGeneratorSource<Long> source(double perSecond, long count) {
        if (!(perSecond > 0) || count < 1) {
            throw new IllegalArgumentException("ticks per second and count must be positive");
        }
        return new DataGeneratorSource<>(
                new Ticks(), count, RateLimiterStrategy.perSecond(perSecond), Types.LONG);
    }
}
