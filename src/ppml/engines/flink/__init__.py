"""Apache Flink with ppml: Flink's own Python environment (`environment`), its configuration with
mutual TLS (`config`), a standalone cluster (`cluster`), running jobs (`submit`), the key relay
that serves a job's operators (`relay`) and, in Flink's environment only, the encrypted sources
and sinks (`streams`, re-exported by `ppml.flink`)."""
