// Validate KEDA and Prometheus-operator objects against their CRD schemas, as
// compiled by the npm packages @kubernetes-models/keda and
// @kubernetes-models/prometheus-operator (installed under .tools/ by `make tools`).
//
//   node validate_crds.mjs <.tools dir> < objects.json
//
// stdin: a JSON array of objects. stdout: a JSON array of
// {"kind", "name", "errors": [...]}, one per object, in order; an object of a kind
// this script does not know gets errors ["unknown kind"].
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const tools = process.argv[2];
const load = (pkg, group) =>
  import(pathToFileURL(join(tools, "node_modules", "@kubernetes-models", pkg, group, "index.js")));

const keda = await load("keda", "keda.sh/v1alpha1");
const monitoring = await load("prometheus-operator", "monitoring.coreos.com/v1");
const models = {
  "keda.sh/v1alpha1": keda,
  "monitoring.coreos.com/v1": monitoring,
};

const objects = JSON.parse(readFileSync(0, "utf8"));
const results = objects.map((obj) => {
  const group = models[obj.apiVersion];
  const Model = group && group[obj.kind];
  const name = obj.metadata?.name ?? "";
  if (!Model) return { kind: obj.kind, name, errors: ["unknown kind"] };
  try {
    new Model(obj).validate();
    return { kind: obj.kind, name, errors: [] };
  } catch (err) {
    return { kind: obj.kind, name, errors: [String(err.message ?? err)] };
  }
});
process.stdout.write(JSON.stringify(results));
