package org.ppml.examples;

import static org.apache.spark.sql.functions.col;

import org.apache.spark.sql.Dataset;
import org.apache.spark.sql.Row;
import org.apache.spark.sql.SparkSession;

/**
 * A summary of a Parquet table with Spark's own reader: its row count and, given a column, the
 * rows per value. {@code ppml spark-submit --tee sim --decrypt enc/people.parquet --class
 * org.ppml.examples.ParquetSummary spark-examples.jar enc/people.parquet [COLUMN]} reads ppml's
 * encrypted Parquet: the attested driver releases the keys of the {@code --decrypt} files to
 * Spark's Parquet reader. The application is plain Spark code and needs nothing of ppml.
 */
public final class ParquetSummary {
    private ParquetSummary() {}

    public static void main(String[] args) {
        if (args.length < 1 || args.length > 2) {
            throw new IllegalArgumentException("usage: ParquetSummary PATH [COLUMN]");
        }
        SparkSession spark = SparkSession.builder().appName("ParquetSummary").getOrCreate();
        try {
            Dataset<Row> table = spark.read().parquet(args[0]);
            System.out.println("rows " + table.count());
            if (args.length == 2) {
                Dataset<Row> counts = table.groupBy(col(args[1])).count().orderBy(col(args[1]));
                for (Row row : counts.collectAsList()) {
                    System.out.println(row.get(0) + "\t" + row.getLong(1));
                }
            }
        } finally {
            spark.stop();
        }
    }
}
