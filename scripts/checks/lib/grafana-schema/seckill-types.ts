// Types the dashboard JSON is checked against, built from Grafana's own dashboard schema
// (@grafana/schema, the TypeScript generated from Grafana's CUE schema kinds).
//
// Two layers, both must accept deploy/grafana/seckill.json:
//  1. JsonOf<Dashboard>: Grafana's `Dashboard` type as JSON (see JsonOf). Checks the dashboard
//     model: required fields, field types, enum values, no unknown keys in the typed parts
//     (panels, gridPos, fieldConfig, thresholds, mappings, variables, annotations, time...).
//  2. JsonOf<SeckillDashboard>: the same with each panel narrowed by its `type` to the panel
//     plugin's options and field config (timeseries, stat), composed from the common types
//     @grafana/schema exports for them (OptionsWithLegend, OptionsWithTooltip,
//     GraphFieldConfig, SingleStatBaseOptions, BigValue* enums, ...), and Prometheus targets.
//     Grafana's Dashboard type leaves `options` and `targets` as open records, so without
//     this layer a misspelt legend option or target key would pass.
import type {
  BigValueColorMode,
  BigValueGraphMode,
  BigValueJustifyMode,
  BigValueTextMode,
  Dashboard,
  DataQuery,
  DataSourceRef,
  FieldConfig,
  FieldConfigSource,
  GraphFieldConfig,
  GridPos,
  OptionsWithLegend,
  OptionsWithTimezones,
  OptionsWithTooltip,
  Panel,
  PercentChangeColorMode,
  RowPanel,
  SingleStatBaseOptions,
} from '@grafana/schema';

// The JSON form of a schema type: Grafana's string enums (LegendDisplayMode, MappingType,
// ThresholdsMode, ...) are written in JSON as their string values, which TypeScript would not
// accept for an enum-typed field. `${E}` turns a string enum into the union of its values;
// numeric enums (VariableHide, VariableRefresh, ...) already accept their numeric values.
export type JsonOf<T> = T extends string
  ? `${T}`
  : T extends ReadonlyArray<infer U>
    ? Array<JsonOf<U>>
    : T extends object
      ? { [K in keyof T]: JsonOf<T[K]> }
      : T;

export type GrafanaDashboardJson = JsonOf<Dashboard>;

// A Prometheus query target (fields of Grafana's Prometheus dataquery kind used here).
export interface PromTarget extends DataQuery {
  datasource: DataSourceRef;
  expr: string;
  legendFormat: string;
  editorMode?: 'code' | 'builder';
  range?: boolean;
  instant?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  interval?: string;
  exemplar?: boolean;
}

interface PanelCommon extends Omit<Panel, 'type' | 'options' | 'fieldConfig' | 'targets' | 'datasource'> {
  id: number;
  title: string;
  description: string;
  gridPos: GridPos;
  datasource: DataSourceRef;
  targets: PromTarget[];
}

interface Overrides {
  overrides: FieldConfigSource['overrides'];
}

// timeseries panel: options = legend + tooltip (+ timezone), field config custom = GraphFieldConfig
export interface TimeSeriesPanel extends PanelCommon {
  type: 'timeseries';
  options: OptionsWithLegend & OptionsWithTooltip & OptionsWithTimezones;
  fieldConfig: Overrides & {
    defaults: Omit<FieldConfig, 'custom' | 'unit'> & { unit: string; custom: GraphFieldConfig };
  };
}

// stat panel: Grafana's stat panelcfg Options
export interface StatOptions extends SingleStatBaseOptions {
  graphMode: BigValueGraphMode;
  colorMode: BigValueColorMode;
  justifyMode: BigValueJustifyMode;
  textMode: BigValueTextMode;
  wideLayout: boolean;
  showPercentChange: boolean;
  percentChangeColorMode?: PercentChangeColorMode;
}

export interface StatPanel extends PanelCommon {
  type: 'stat';
  options: StatOptions;
  fieldConfig: Overrides & { defaults: Omit<FieldConfig, 'custom' | 'unit'> & { unit: string } };
}

export interface Row extends RowPanel {
  type: 'row';
  title: string;
  gridPos: GridPos;
}

export interface SeckillDashboard extends Omit<Dashboard, 'panels'> {
  uid: string;
  title: string;
  panels: Array<Row | TimeSeriesPanel | StatPanel>;
}

export type SeckillDashboardJson = JsonOf<SeckillDashboard>;
