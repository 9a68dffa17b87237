// Validate prometheus-operator custom resources against the CRD schemas compiled into the npm package
// @kubernetes-models/prometheus-operator (generated from prometheus-operator's CRDs).
//   node crd_validate.mjs <node_modules dir>  < objects.json   (a JSON array)
// Prints a JSON array: [{kind, name, ok, error}]. Exit 2 when the package cannot be loaded.
import { pathToFileURL } from "node:url";
import { join } from "node:path";
import { readFileSync } from "node:fs";

const modules = process.argv[2];
const base = join(modules, "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1");
const classes = {};
try {
  for (const kind of ["ServiceMonitor", "PrometheusRule", "PodMonitor"]) {
    classes[kind] = (await import(pathToFileURL(join(base, `${kind}.js`)).href))[kind];
  }
} catch (e) {
  console.error(`cannot load @kubernetes-models/prometheus-operator from ${modules}: ${e.message}`);
  process.exit(2);
}
const objects = JSON.parse(readFileSync(0, "utf8"));
const results = objects.map((obj) => {
  const cls = obj.apiVersion === "monitoring.coreos.com/v1" ? classes[obj.kind] : undefined;
  const name = obj.metadata?.name;
  if (!cls) return { kind: obj.kind, name, ok: false, error: `no schema for ${obj.apiVersion} ${obj.kind}` };
  try {
    new cls(obj).validate();
    return { kind: obj.kind, name, ok: true, error: null };
  } catch (e) {
    return { kind: obj.kind, name, ok: false, error: e.message };
  }
});
console.log(JSON.stringify(results));
