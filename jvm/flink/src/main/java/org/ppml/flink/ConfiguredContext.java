package org.ppml.flink;

import org.apache.flink.configuration.Configuration;
import org.apache.flink.configuration.DeploymentOptions;
import org.apache.flink.configuration.GlobalConfiguration;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;

/**
 * Makes {@code StreamExecutionEnvironment.getExecutionEnvironment()} build its environment from
 * the configuration in {@code FLINK_CONF_DIR} (TLS, Python in threads, scratch directories,
 * checkpoints) with the given target: {@code local}, a mini-cluster in this JVM, or {@code
 * remote}, the cluster that configuration names (REST address, port and TLS), attached, as
 * {@code flink run} does. For a job run by its own Python process: under {@code --tee}, that
 * process must keep the evidence channel that {@code flink run}'s launcher would not pass on.
 */
public final class ConfiguredContext extends StreamExecutionEnvironment {
    private ConfiguredContext() {}

    /** Installs the context environment for this JVM (call before the job is built). */
    public static void install(String target) {
        if (!"local".equals(target) && !"remote".equals(target)) {
            throw new IllegalArgumentException("target must be local or remote");
        }
        initializeContextEnvironment(
                configuration -> {
                    Configuration merged = GlobalConfiguration.loadConfiguration();
                    merged.addAll(configuration);
                    merged.set(DeploymentOptions.TARGET, target);
                    merged.set(DeploymentOptions.ATTACHED, true);
                    return new StreamExecutionEnvironment(merged);
                });
    }
}
