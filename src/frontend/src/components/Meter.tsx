// A thin usage bar (e.g. KV cache tokens used of the budget); turns amber past 80 %, red past 95 %.
interface Props {
  value: number;
  max: number;
}

export function Meter({ value, max }: Props) {
  const frac = max > 0 ? Math.min(1, Math.max(0, value / max)) : 0;
  const level = frac > 0.95 ? "bad" : frac > 0.8 ? "warn" : "ok";
  return (
    <span
      className={`meter meter-${level}`}
      role="meter"
      aria-valuemin={0}
      aria-valuemax={max}
      aria-valuenow={value}
      aria-label={`${Math.round(frac * 100)} % used`}
    >
      <span style={{ width: `${frac * 100}%` }} />
    </span>
  );
}
