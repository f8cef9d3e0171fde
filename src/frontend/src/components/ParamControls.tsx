// Sampling controls. Values stay strings as typed; parseControls (params.ts) converts on send.
import type { ControlValues } from "../params";
import { DEFAULT_CONTROLS } from "../params";

interface Props {
  values: ControlValues;
  errors: Partial<Record<keyof ControlValues, string>>;
  disabled: boolean;
  onChange: (values: ControlValues) => void;
}

interface Field {
  key: keyof ControlValues;
  label: string;
  hint: string;
  step?: string;
  min?: string;
  max?: string;
}

const FIELDS: Field[] = [
  { key: "maxTokens", label: "Max tokens", hint: "", step: "1", min: "1" },
  { key: "temperature", label: "Temperature", hint: "0 = greedy", step: "0.05", min: "0" },
  { key: "topP", label: "Top-p", hint: "", step: "0.05", min: "0", max: "1" },
  { key: "topK", label: "Top-k", hint: "0 = off", step: "1", min: "0" },
  { key: "seed", label: "Seed", hint: "empty = random", step: "1" },
];

export function ParamControls({ values, errors, disabled, onChange }: Props) {
  const set = (key: keyof ControlValues, v: string): void => onChange({ ...values, [key]: v });
  const changed = (Object.keys(DEFAULT_CONTROLS) as (keyof ControlValues)[]).some((k) => values[k] !== DEFAULT_CONTROLS[k]);
  return (
    <fieldset className="controls" disabled={disabled}>
      <legend className="sr-only">Sampling parameters</legend>
      {FIELDS.map((f) => (
        <label key={f.key} className={`control${errors[f.key] ? " invalid" : ""}`}>
          <span className="control-label">
            {f.label}
            <span className="muted"> {f.hint || `default ${DEFAULT_CONTROLS[f.key]}`}</span>
          </span>
          <input
            type="number"
            inputMode="decimal"
            name={f.key}
            data-testid={`param-${f.key}`}
            value={values[f.key]}
            step={f.step}
            min={f.min}
            max={f.max}
            placeholder={f.key === "seed" ? "random" : DEFAULT_CONTROLS[f.key]}
            aria-invalid={errors[f.key] ? true : undefined}
            onChange={(e) => set(f.key, e.target.value)}
          />
          {errors[f.key] && <span className="field-error">{errors[f.key]}</span>}
        </label>
      ))}
      <label className="control control-wide">
        <span className="control-label">
          Stop sequences <span className="muted">comma or newline separated; \n \t \, escapes; default none</span>
        </span>
        <textarea
          name="stop"
          data-testid="param-stop"
          rows={1}
          value={values.stop}
          placeholder="e.g. \n\n, User:"
          onChange={(e) => set("stop", e.target.value)}
        />
      </label>
      <button type="button" className="link" onClick={() => onChange(DEFAULT_CONTROLS)} disabled={!changed || disabled}>
        Reset to defaults
      </button>
    </fieldset>
  );
}
