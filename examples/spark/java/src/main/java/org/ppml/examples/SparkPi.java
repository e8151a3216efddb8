package org.ppml.examples;

import java.util.ArrayList;
import java.util.List;
import org.apache.spark.api.java.JavaRDD;
import org.apache.spark.api.java.JavaSparkContext;
import org.apache.spark.sql.SparkSession;

/**
 * Pi by throwing darts, as Spark's own example: {@code ppml spark-submit --class
 * org.ppml.examples.SparkPi spark-examples.jar [SLICES]}. Spark's security settings come from
 * {@code ppml spark-submit}; the application needs nothing of ppml.
 */
public final class SparkPi {
    private SparkPi() {}

    public static void main(String[] args) {
        SparkSession spark = SparkSession.builder().appName("JavaSparkPi").getOrCreate();
        try (JavaSparkContext jsc = new JavaSparkContext(spark.sparkContext())) {
            int slices = args.length > 0 ? Integer.parseInt(args[0]) : 2;
            int n = 100000 * slices;
            List<Integer> seeds = new ArrayList<>(n);
            for (int i = 0; i < n; i++) {
                seeds.add(i);
            }
            JavaRDD<Integer> darts = jsc.parallelize(seeds, slices);
            long inside =
                    darts.filter(
                                    i -> {
                                        java.util.SplittableRandom r = new java.util.SplittableRandom(i);
                                        double x = r.nextDouble() * 2 - 1;
                                        double y = r.nextDouble() * 2 - 1;
                                        return x * x + y * y <= 1;
                                    })
                            .count();
            System.out.println("Pi is roughly " + 4.0 * inside / n);
        } finally {
            spark.stop();
        }
    }
}
